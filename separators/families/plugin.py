"""Any separator a user has as Python code, as a base model.

    -m py:package.module:factory[?key=value&...]     the factory called with the keywords
                                                     (`name=` names the model instead)
    -m entry:NAME  (or plain NAME)                   a `pipeline.separators` entry point

The factory returns a torch module or any callable that takes mixtures [B, 2, n] at its sample
rate and returns stems [B, S, 2, n] (or [S, 2, n] for B = 1), and declares, as attributes of
what it returns, `sources` (stem names, mapped onto the dataset's by core.sources) and
`sample_rate`; optionally `segment` (seconds: longer inputs are cut into Hann-weighted segments
with core.chunking.overlap_add, hop a quarter segment). Keyword values are parsed as JSON
when they can be (`?n_fft=2048&soft=true`), else passed as strings.

The stem store's model key covers the factory's name and keywords, the module's source file and,
for a torch module, its weights.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from pathlib import Path

import torch

from core.errors import PipelineError
from separators.base import Separator, parse_query
from separators.families import Family
from separators.weights import combined_checksum

FAMILY = "plugin"
ENTRY_POINT_GROUP = "pipeline.separators"


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def entry_point(name: str):
    """The `pipeline.separators` entry point called `name`, or None."""
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == name]
    return found[0] if found else None


def _resolve(spec: str):
    """(factory, its dotted name) for 'py:module:factory' or 'entry:NAME'."""
    if spec.startswith("entry:"):
        ep = entry_point(spec[len("entry:"):])
        if ep is None:
            raise PipelineError(f"{spec}: no '{ENTRY_POINT_GROUP}' entry point of that name is "
                                f"installed")
        try:
            return ep.load(), ep.value
        except Exception as e:
            raise PipelineError(f"{spec}: cannot load {ep.value} ({type(e).__name__}: {e})") from None
    target = spec[len("py:"):]
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PipelineError(f"{spec}: expected py:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise PipelineError(f"{spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PipelineError(f"{spec}: {module_name} has no '{attr}'")
        obj = getattr(obj, part)
    return obj, target


def _source_checksum(obj) -> str:
    try:
        path = inspect.getsourcefile(obj)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    except (TypeError, OSError):
        return ""


class PluginSeparator(Separator):
    family = FAMILY

    def __init__(self, model, name: str, params: dict, checksum: str):
        from core.sources import canonical_sources

        missing = [a for a in ("sources", "sample_rate") if not hasattr(model, a)]
        if missing:
            raise PipelineError(f"{name}: the plugin's separator must declare "
                                f"{' and '.join(missing)} (attributes of what the factory returns)")
        self.model, self.name, self.params, self._checksum = model, name, params, checksum
        self.declared = tuple(model.sources)
        self.sources = canonical_sources(self.declared)
        self.sample_rate = int(model.sample_rate)
        self.segment = getattr(model, "segment", None)
        if isinstance(model, torch.nn.Module):
            model.eval()

    def options(self) -> dict:
        return {"params": self.params, "segment": self.segment, "stems": list(self.declared)}

    def to(self, device) -> "PluginSeparator":
        super().to(device)
        if isinstance(self.model, torch.nn.Module):
            self.model.to(self.device)
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(self.model(x))
        if y.dim() == 3 and x.shape[0] == 1:
            y = y[None]
        if y.dim() != 4 or y.shape[1] != len(self.sources) or y.shape[2] != 2:
            raise PipelineError(f"{self.name}: returned shape {tuple(y.shape)} for input "
                                f"{tuple(x.shape)}; expected [B, {len(self.sources)}, 2, n]")
        return y.float()

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        from core.chunking import overlap_add

        mix = mixture.to(self.device, torch.float32)
        if self.segment:
            seg = int(round(float(self.segment) * self.sample_rate))
            if mix.shape[-1] > seg:
                return overlap_add(self._run, mix, seg, hop=seg // 4)
        return self._run(mix[None])[0, ..., :mix.shape[-1]]


def load_plugin(spec: str, *, device="cpu") -> PluginSeparator:
    base, raw = parse_query(spec)
    params = {k: _value(v) for k, v in raw.items()}
    label = str(params.pop("name", ""))
    factory, dotted = _resolve(base)
    try:
        model = factory(**params) if callable(factory) else factory
    except Exception as e:
        raise PipelineError(f"{spec}: the factory failed ({type(e).__name__}: {e})") from None
    weights = ""
    if isinstance(model, torch.nn.Module):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        weights = h.hexdigest()
    checksum = combined_checksum({"factory": dotted, "source": _source_checksum(factory),
                                  "weights": weights})
    name = label or dotted.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return PluginSeparator(model, name, params, checksum).to(device)


def _entry_point_names() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(e.name for e in entry_points(group=ENTRY_POINT_GROUP))


RECORD = Family(
    name=FAMILY,
    summary="any separator as Python code: py:package.module:factory[?key=value...], "
            "entry:NAME, or an installed entry point's NAME",
    load=lambda r: load_plugin(r.spec if r.spec.startswith(("py:", "entry:")) else f"entry:{r.spec}",
                               device=r.device),
    owns=lambda spec: spec.startswith(("py:", "entry:")),
    knows=lambda name, repo: entry_point(name) is not None, names=_entry_point_names)
