"""Spin and orientational degeneracies of a defect configuration (paper Eq. 5-6)."""

from __future__ import annotations

from ase import Atoms

from defectml.errors import DefectMLError

#: Order of each crystallographic point group (Schoenflies).
POINT_GROUP_ORDER: dict[str, int] = {
    "C1": 1,
    "Ci": 2,
    "Cs": 2,
    "C2": 2,
    "C2h": 4,
    "C2v": 4,
    "D2": 4,
    "D2h": 8,
    "C4": 4,
    "S4": 4,
    "C4h": 8,
    "D4": 8,
    "C4v": 8,
    "D2d": 8,
    "D4h": 16,
    "C3": 3,
    "S6": 6,
    "C3i": 6,
    "D3": 6,
    "C3v": 6,
    "D3d": 12,
    "C6": 6,
    "C3h": 6,
    "C6h": 12,
    "D6": 12,
    "C6v": 12,
    "D3h": 12,
    "D6h": 24,
    "T": 12,
    "Th": 24,
    "O": 24,
    "Td": 24,
    "Oh": 48,
}


def point_group_order(symbol: str) -> int:
    """Number of symmetry operations of the point group ``symbol`` (Schoenflies).

    Raises:
        DefectMLError: for a symbol that is not one of the 32 crystallographic point groups.
    """
    try:
        return POINT_GROUP_ORDER[symbol]
    except KeyError:
        raise DefectMLError(
            f"unknown point group {symbol!r}; expected a Schoenflies symbol "
            f"such as {', '.join(list(POINT_GROUP_ORDER)[:6])}"
        ) from None


def orientational_degeneracy(bulk_site_symmetry: str, defect_symmetry: str) -> float:
    """Omega_orient = N_b / N_d: symmetry operations of the site in the bulk over the defect's.

    A Td vacancy that relaxes to C2v has 24/4 = 6 equivalent orientations; a value below 1 means
    the relaxed defect is more symmetric than its unrelaxed site (interstitials, paper Eq. 6).
    """
    return point_group_order(bulk_site_symmetry) / point_group_order(defect_symmetry)


def electron_count(atoms: Atoms, charge: int) -> int:
    """Total electrons of ``atoms`` in charge state ``charge`` (all-electron count).

    Core shells hold even numbers of electrons, so the parity of this count is that of the
    valence electrons a DFT code would see.
    """
    return int(sum(atoms.get_atomic_numbers())) - int(charge)


def spin_degeneracy(atoms: Atoms, charge: int, magnetic_moment: float | None = None) -> int:
    """Omega_spin = 2S + 1 (paper Eq. 5).

    Args:
        atoms: The defect supercell.
        charge: Its charge state.
        magnetic_moment: Total moment in Bohr magnetons (2S) when known from a spin-polarised
            calculation; otherwise the lowest spin consistent with the electron count is used
            (S = 1/2 for an odd count, 0 for an even one).
    """
    if magnetic_moment is not None:
        two_s = int(round(abs(magnetic_moment)))
        if two_s % 2 != electron_count(atoms, charge) % 2:
            raise DefectMLError(
                f"magnetic moment {magnetic_moment} is inconsistent with "
                f"{electron_count(atoms, charge)} electrons"
            )
        return two_s + 1
    return 2 if electron_count(atoms, charge) % 2 else 1
