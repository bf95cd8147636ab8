"""Direct relaxed-structure prediction: a defect-aware equivariant graph network (DefiNet-style).

``graph`` turns an unrelaxed defect supercell plus its pristine supercell into a graph whose nodes
are typed pristine / substituted / vacancy (a placeholder at the empty site carrying the removed
element) / interstitial; ``model`` is the network (ours, PaiNN-style scalar + vector features with
defect-type-modulated messages and per-layer coordinate updates); ``data`` reads the 2DMD pairs;
``train`` fits it (checkpoints resume); ``metrics`` scores coordinates against DFT; ``predict``
applies a trained model to new structures.
"""

from defectml.predictor.graph import DefectGraph, NodeType, build_graph

__all__ = ["DefectGraph", "NodeType", "build_graph"]
