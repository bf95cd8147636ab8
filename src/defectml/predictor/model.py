"""The network: equivariant message passing with defect-type-modulated messages and coordinate updates.

Written for defectml (PyTorch only). Each node carries scalar features s (F) and vector features
v (3 x F). A layer (1) passes PaiNN-style messages whose filters are gated by a learned function of
the defect types of both ends (pristine / substituted / vacancy / interstitial), (2) mixes scalar
and vector channels, and (3) moves the real atoms by a vector read out of v plus a weighted sum of
edge directions. Edges are fixed (built on the unrelaxed structure); their vectors follow the
updated coordinates. Vacancy placeholders carry messages but never move. The output is the
displacement of every atom from its unrelaxed position: rotation-equivariant, translation-invariant.
With ``zero_net_displacement`` the mean displacement of each structure's real atoms is removed, as a
plane-wave DFT relaxation (which drops the net force) leaves it: the 2DMD targets sum to zero exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from defectml.errors import DefectMLError
from defectml.predictor.graph import DefectGraph, NodeType


@dataclass
class ModelConfig:
    """Hyper-parameters (the small CPU configuration is the default)."""

    features: int = 64
    layers: int = 3
    rbf: int = 16
    cutoff: float = 6.0
    max_z: int = 100
    zero_net_displacement: bool = True
    prior_features: int = 0
    force_prior: bool = False
    virtual_node: bool = False
    norm: bool = False

    def to_dict(self) -> dict:
        """Plain dictionary (stored in checkpoints)."""
        return asdict(self)


def _scatter(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros((n, *src.shape[1:]), dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)


def _graph_sum(x: torch.Tensor, b: Batch) -> torch.Tensor:
    """Per-structure sums (n_graphs, ...).

    A single structure is summed directly: torch.compile's CPU code generator fails on a scatter into
    a size-1 output (torch 2.13).
    """
    if b.n_graphs == 1:
        return x.sum(0, keepdim=True)
    return _scatter(x, b.graph, b.n_graphs)


def _cat_optional(parts: list, device: str) -> torch.Tensor | None:
    """Concatenated per-node tensors, or None unless every graph has one."""
    return torch.cat(parts).to(device) if parts and all(p is not None for p in parts) else None


class Batch:
    """Several graphs as one disconnected graph."""

    def __init__(self, graphs: list[DefectGraph], device: str = "cpu"):
        offsets, n = [], 0
        for g in graphs:
            offsets.append(n)
            n += len(g.z)
        self.n_nodes = n
        self.z = torch.cat([g.z for g in graphs]).to(device)
        self.z_host = torch.cat([g.z_host for g in graphs]).to(device)
        self.node_type = torch.cat([g.node_type for g in graphs]).to(device)
        self.pos = torch.cat([g.pos for g in graphs]).to(device)
        self.edge_index = torch.cat([g.edge_index + o for g, o in zip(graphs, offsets, strict=True)], 1).to(
            device
        )
        self.shift = torch.cat([g.shift for g in graphs]).to(device)
        self.graph = torch.cat([torch.full((len(g.z),), k) for k, g in enumerate(graphs)]).to(device)
        self.real = self.node_type != NodeType.VACANCY
        has_target = all(g.target is not None for g in graphs)
        self.target = torch.cat([g.target for g in graphs]).to(device) if has_target else None
        # distance of each node to the nearest defect site: weights the training loss (targets only)
        self.near = torch.cat([g.defect_distance() for g in graphs]).to(device) if has_target else None
        self.atom_prior = _cat_optional([g.atom_prior for g in graphs], device)
        self.force_prior = _cat_optional([g.force_prior for g in graphs], device)
        self.n_graphs = len(graphs)


class _Radial(nn.Module):
    def __init__(self, n: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("freq", torch.arange(1, n + 1, dtype=torch.float32) * torch.pi / cutoff)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = d.unsqueeze(-1)
        fcut = 0.5 * (torch.cos(torch.pi * d.clamp(max=self.cutoff) / self.cutoff) + 1.0)
        return torch.sin(self.freq * d) / d.clamp(min=1e-3) * fcut, fcut


class _Layer(nn.Module):
    def __init__(self, f: int, n_rbf: int, norm: bool = False):
        super().__init__()
        self.f = f
        # LayerNorm on what the MLPs read (the residual stream itself is left as it is): keeps the
        # features bounded on inputs unlike the training set's (e.g. partly relaxed structures)
        self.norm_in = nn.LayerNorm(f) if norm else nn.Identity()
        self.norm_mid = nn.LayerNorm(f) if norm else nn.Identity()
        self.phi = nn.Sequential(nn.Linear(f, f), nn.SiLU(), nn.Linear(f, 3 * f))
        self.filter = nn.Linear(n_rbf, 3 * f)
        self.type_gate = nn.Embedding(len(NodeType) ** 2, 3 * f)
        self.u = nn.Linear(f, f, bias=False)
        self.v = nn.Linear(f, f, bias=False)
        self.update = nn.Sequential(nn.Linear(2 * f, f), nn.SiLU(), nn.Linear(f, 3 * f))
        self.to_dx = nn.Linear(f, 1, bias=False)
        self.edge_weight = nn.Sequential(nn.Linear(2 * f + n_rbf, f), nn.SiLU(), nn.Linear(f, 1))
        nn.init.normal_(self.to_dx.weight, std=1e-3)
        nn.init.normal_(self.edge_weight[-1].weight, std=1e-3)
        nn.init.zeros_(self.edge_weight[-1].bias)

    def forward(self, s, v, x, b: Batch, radial: _Radial):
        j, i = b.edge_index
        r = x[j] + b.shift - x[i]
        d = torch.linalg.norm(r, dim=-1)
        e = r / d.clamp(min=1e-3).unsqueeze(-1)
        rbf, fcut = radial(d)
        gate = torch.sigmoid(self.type_gate(b.node_type[i] * len(NodeType) + b.node_type[j]))
        m = self.phi(self.norm_in(s))[j] * self.filter(rbf) * fcut * gate
        ms, mv, me = torch.split(m, self.f, dim=-1)
        n = b.n_nodes
        s = s + _scatter(ms, i, n)
        v = v + _scatter(mv.unsqueeze(1) * v[j] + me.unsqueeze(1) * e.unsqueeze(-1), i, n)
        uv, vv = self.u(v), self.v(v)
        a = self.update(torch.cat([self.norm_mid(s), torch.sqrt((vv**2).sum(1) + 1e-8)], -1))
        avv, asv, ass = torch.split(a, self.f, dim=-1)
        v = v + avv.unsqueeze(1) * uv
        s = s + asv * (uv * vv).sum(1) + ass
        sn = self.norm_mid(s)
        w = self.edge_weight(torch.cat([sn[i], sn[j], rbf], -1)) * fcut
        dx = self.to_dx(v).squeeze(-1) + _scatter(w * e, i, n)
        x = x + dx * b.real.unsqueeze(-1)
        return s, v, x


class _VirtualNode(nn.Module):
    """Global context: every node reads its structure's mean scalar and vector features."""

    def __init__(self, f: int):
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(2 * f, f), nn.SiLU(), nn.Linear(f, f))
        self.vec = nn.Linear(f, f, bias=False)
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)
        nn.init.zeros_(self.vec.weight)

    def forward(self, s: torch.Tensor, v: torch.Tensor, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        count = _graph_sum(torch.ones_like(s[:, :1]), b)
        mean_s, mean_v = _graph_sum(s, b) / count, _graph_sum(v, b) / count.unsqueeze(-1)
        s = s + self.mix(torch.cat([s, mean_s[b.graph]], -1))
        return s, v + self.vec(mean_v)[b.graph]


class DefectRelaxNet(nn.Module):
    """Unrelaxed defect graph -> displacement of every atom (A)."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        c = config or ModelConfig()
        self.config = c
        self.embed_z = nn.Embedding(c.max_z + 1, c.features)
        self.embed_host = nn.Embedding(c.max_z + 1, c.features)
        self.embed_type = nn.Embedding(len(NodeType), c.features)
        self.radial = _Radial(c.rbf, c.cutoff)
        self.layers = nn.ModuleList(_Layer(c.features, c.rbf, c.norm) for _ in range(c.layers))
        if c.virtual_node:
            self.globals = nn.ModuleList(_VirtualNode(c.features) for _ in range(c.layers))
        if c.prior_features:
            self.embed_prior = nn.Sequential(
                nn.LayerNorm(c.prior_features),
                nn.Linear(c.prior_features, c.features), nn.SiLU(), nn.Linear(c.features, c.features)
            )
        if c.force_prior:
            self.force_scalar = nn.Linear(1, c.features)
            self.force_vector = nn.Parameter(torch.randn(c.features) * 0.1)

    def _inputs(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial scalar (nodes, F) and vector (nodes, 3, F) features, with the MLIP priors if used."""
        c = self.config
        s = self.embed_z(b.z) + self.embed_host(b.z_host) + self.embed_type(b.node_type)
        v = torch.zeros(b.n_nodes, 3, s.shape[-1], dtype=s.dtype, device=s.device)
        if c.prior_features:
            if b.atom_prior is None:
                raise DefectMLError("this predictor needs MLIP atom features (predictor.prior.attach_priors)")
            s = s + self.embed_prior(b.atom_prior)
        if c.force_prior:
            if b.force_prior is None:
                raise DefectMLError("this predictor needs MLIP forces (predictor.prior.attach_priors)")
            f = b.force_prior
            s = s + self.force_scalar(torch.linalg.norm(f, dim=-1, keepdim=True))
            v = v + f.unsqueeze(-1) * self.force_vector
        return s, v

    def forward(self, b: Batch, layers: list | None = None) -> torch.Tensor:
        """Predicted displacements (nodes, 3); zero for vacancy placeholders.

        ``layers``: callables standing in for ``self.layers`` (e.g. each one compiled separately).
        """
        s, v = self._inputs(b)
        x = b.pos
        for k, layer in enumerate(layers or self.layers):
            if self.config.virtual_node:
                s, v = self.globals[k](s, v, b)
            s, v, x = layer(s, v, x, b, self.radial)
        disp = x - b.pos
        if self.config.zero_net_displacement:
            w = b.real.to(disp.dtype).unsqueeze(-1)
            count = _graph_sum(w, b).clamp(min=1.0)
            mean = _graph_sum(disp * w, b) / count
            disp = (disp - mean[b.graph]) * w
        return disp


class Ensemble(nn.Module):
    """Several trained networks whose predicted displacements are averaged.

    Members must share the cutoff (the graph is built once for all of them). Averaging independently
    trained models lowers the variance part of the error, which dominates on small training sets.
    """

    def __init__(self, members: list[DefectRelaxNet]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        cutoffs = {m.config.cutoff for m in members}
        if len(cutoffs) > 1:
            raise ValueError(f"ensemble members use different cutoffs {sorted(cutoffs)}")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, b: Batch) -> torch.Tensor:
        """Mean of the members' displacements (nodes, 3)."""
        return torch.stack([m(b) for m in self.members]).mean(0)


def recycled(model: nn.Module, b: Batch, passes: int = 1) -> torch.Tensor:
    """Displacements from ``passes`` applications of ``model``, each on the previous prediction.

    The graph (edges, node types) stays the one built on the unrelaxed structure; only positions move.
    Useful for a model trained with partly relaxed inputs (``TrainSettings.interpolate``).
    """
    if passes < 1:
        raise ValueError("passes must be at least 1")
    pos0 = b.pos
    total = torch.zeros_like(pos0)
    try:
        for _ in range(passes):
            b.pos = pos0 + total
            total = total + model(b)
    finally:
        b.pos = pos0
    return total


def distance_loss(
    pred: torch.Tensor, b: Batch, local_weight: float = 0.0, radius: float = 3.0
) -> torch.Tensor:
    """Mean distance between predicted and relaxed positions over real atoms.

    With ``local_weight`` > 0 the atoms within ``radius`` of a defect site count ``1 + local_weight``
    times (a weighted mean), steering the fit toward the defect neighbourhoods the A3 metric scores.
    """
    dist = torch.sqrt(((pred - b.target) ** 2).sum(-1) + 1e-12)[b.real]
    if local_weight <= 0:
        return dist.mean()
    w = 1.0 + local_weight * (b.near[b.real] <= radius).to(dist.dtype)
    return (w * dist).sum() / w.sum()
