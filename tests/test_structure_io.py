import pytest
from ase.build import bulk

from defectml.errors import InputError
from defectml.structure_io import read_structure, to_structure, write_structure


def test_reads_cif_poscar_and_extxyz(tmp_path, cdte):
    cdte.to(filename=str(tmp_path / "POSCAR"), fmt="poscar")
    from ase.io import write

    from defectml.structure_io import to_atoms

    write(tmp_path / "host.extxyz", to_atoms(cdte))
    for name in ("POSCAR", "host.extxyz"):
        s = read_structure(tmp_path / name)
        assert s.composition.reduced_formula == "CdTe"
        assert len(s) == 8


def test_ase_atoms_in(tmp_path):
    s = to_structure(bulk("Cu", "fcc", a=3.61))
    assert s.composition.reduced_formula == "Cu"
    with pytest.raises(InputError, match="periodic"):
        from ase import Atoms

        to_structure(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]))


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), ("", "empty"), ("this is not a crystal\n", "cannot read")],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "host.cif"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_structure(path)


def test_write_structure(tmp_path, cdte):
    files = write_structure(cdte, tmp_path / "out" / "min")
    assert [f.suffix for f in files] == [".cif", ".vasp"]
    assert read_structure(files[1]).composition == cdte.composition
