"""The derived splits: `select` is a fixed tenth of train chosen by name, `fit` the rest."""
from types import SimpleNamespace

from core.splits import resolve, selection_names


def _tracks(names, split="train"):
    return [SimpleNamespace(name=n, split=split) for n in names]


def test_select_and_fit_partition_train():
    tracks = _tracks([f"song {i}" for i in range(80)]) + _tracks(["v1", "v2"], "valid")
    select, fit = resolve("select", tracks), resolve("fit", tracks)
    assert len(select) == 8 and len(fit) == 72
    assert {t.name for t in select}.isdisjoint(t.name for t in fit)
    assert {t.name for t in select} | {t.name for t in fit} == {f"song {i}" for i in range(80)}
    assert [t.name for t in resolve("valid", tracks)] == ["v1", "v2"]


def test_selection_depends_on_names_only():
    names = [f"song {i}" for i in range(50)]
    a = selection_names(names)
    assert a == selection_names(list(reversed(names)))
    # adding tracks keeps every old selected track selected unless it is pushed out by rank
    b = selection_names(names + [f"new {i}" for i in range(5)])
    assert len(a - b) <= 5
    assert selection_names(["only"]) == set()
    assert len(selection_names(["a", "b"])) == 1
