"""Turn a model SPEC string from the command line into a model and example inputs.

Contract: ``load_spec(spec)`` returns ``(model, example_args, name)`` where ``model(*example_args)``
runs and ``name`` is a short display name safe to use in a file name. Every failure the user can
fix raises ``SpecError`` whose message is one line saying what is wrong and what to do; nothing
else escapes for a malformed spec.

SPEC forms:

- ``builtin:NAME[:key=value,...]``: a model from ``moec.models.builtin.BUILTIN_MODELS``; the keys
  are the factory's size overrides (``moec.models.builtin.OVERRIDES``: ``hidden``,
  ``intermediate``, ``num_experts``, ``top_k``, ``num_layers``, ``seed``).
- ``hf:ARCH[:key=value,...]``: a small random transformers model from ``moec.models.hf``; values
  are read as int, float, bool (``true``/``false``) or else str; the key ``experts`` picks the
  transformers experts implementation (``eager``, ``grouped_mm`` or ``batched_mm``) and every
  other key overrides a config field.
- ``path/to/file.py:factory``: imports the file by path and calls ``factory()``. It returns a
  model, ``(model, example_input)`` or ``(model, tuple_of_args)``. For a bare model an input is
  made: random ``input_ids`` of shape [1, 16] if the model has ``config.vocab_size``, else a
  float tensor [1, 16, hidden] with hidden the first ``nn.Linear``'s ``in_features``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from typing import Any

import torch
from torch import nn

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
EXAMPLE_TOKENS = 16
FORMS = "builtin:NAME[:key=value,...], hf:ARCH[:key=value,...] or path/to/file.py:factory"


class SpecError(Exception):
    """A model spec that cannot be loaded; the message is one line meant for the user."""


def load_spec(spec: str) -> tuple[nn.Module, tuple, str]:
    spec = spec.strip()
    if not spec:
        raise SpecError(f"empty model spec: give one of {FORMS}")
    scheme, _, rest = spec.partition(":")
    if scheme == "builtin":
        return _load_builtin(rest)
    if scheme == "hf":
        return _load_hf(rest)
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return _load_file(path, factory)
    if spec.endswith(".py"):
        raise SpecError(f"'{spec}' names no factory: write {spec}:FACTORY, where FACTORY() returns the model")
    if os.path.exists(spec):
        raise SpecError(f"'{spec}' is not a .py file: give {FORMS}")
    raise SpecError(f"unknown model spec '{spec}': give {FORMS}")


def _load_builtin(rest: str) -> tuple[nn.Module, tuple, str]:
    from moec.models.builtin import BUILTIN_MODELS, OVERRIDES

    name, _, options = rest.partition(":")
    known = ", ".join(sorted(BUILTIN_MODELS))
    if name not in BUILTIN_MODELS:
        raise SpecError(f"unknown builtin model '{name}': known builtin models are {known}")
    overrides = parse_overrides(options)
    unknown = [k for k in overrides if k not in OVERRIDES]
    if unknown:
        raise SpecError(f"builtin:{rest}: unknown key {unknown[0]}: builtin models take {', '.join(OVERRIDES)}")
    try:
        model, args = BUILTIN_MODELS[name](**overrides)
    except ValueError as e:
        raise SpecError(f"builtin:{rest}: {_one_line(e, with_type=False)}") from None
    suffix = "".join(f"-{k}{v}" for k, v in overrides.items())
    return _finish(model, f"builtin:{rest}"), args, _safe_name(name + suffix)


def _load_hf(rest: str) -> tuple[nn.Module, tuple, str]:
    arch, _, options = rest.partition(":")
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise SpecError(f"hf: specs need transformers ({_one_line(e)}): pip install -e '.[hf]'") from None
    from moec.models.hf import HF_ARCHS, make_hf_model

    if arch not in HF_ARCHS:
        raise SpecError(f"unknown hf architecture '{arch}': known ones are {', '.join(sorted(HF_ARCHS))}")
    overrides = parse_overrides(options)
    experts = overrides.pop("experts", "eager")
    if experts not in EXPERTS_IMPLEMENTATIONS:
        raise SpecError(f"experts={experts} is not one of {', '.join(EXPERTS_IMPLEMENTATIONS)}")
    try:
        model, args = make_hf_model(arch, overrides or None, experts_implementation=experts)
    except ValueError as e:
        raise SpecError(f"hf:{rest}: {_one_line(e, with_type=False)}") from None
    except Exception as e:
        # A config the model cannot be built with (a bad override value) surfaces as anything.
        raise SpecError(f"building hf:{rest} raised {_one_line(e)}: check the key=value overrides") from None
    model = _finish(model, f"hf:{rest}")
    name = "hf-" + arch + ("" if experts == "eager" else f"-{experts}")
    return model, args, _safe_name(name)


def parse_overrides(options: str) -> dict[str, Any]:
    """``"a=1,b=0.5,c=true,d=x"`` -> ``{"a": 1, "b": 0.5, "c": True, "d": "x"}``."""
    overrides: dict[str, Any] = {}
    if not options:
        return overrides
    for item in options.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key.isidentifier() or not value:
            raise SpecError(f"bad override '{item}': write key=value pairs separated by commas, e.g. hf:mixtral:num_local_experts=4,experts=eager")
        if key in overrides:
            raise SpecError(f"override '{key}' is given twice: give each key once")
        overrides[key] = _parse_value(value)
    return overrides


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _load_file(path: str, factory_name: str) -> tuple[nn.Module, tuple, str]:
    spec = f"{path}:{factory_name}"
    if not factory_name.isidentifier():
        raise SpecError(f"'{factory_name}' in '{spec}' is not a function name: write {path}:FACTORY")
    if not os.path.isfile(path):
        raise SpecError(f"no such file '{path}': check the path in '{spec}'")
    module = _import_path(path)
    factory = getattr(module, factory_name, None)
    if factory is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        hint = f"functions defined there: {', '.join(public)}" if public else "define it there"
        raise SpecError(f"'{path}' has no '{factory_name}': {hint}")
    if not callable(factory):
        raise SpecError(f"'{factory_name}' in '{path}' is not callable: it must be a function returning the model")
    result = _call_factory(factory, spec)
    model, args = _split_result(result, spec)
    if args is None:
        args = _make_example(model, spec)
    stem = os.path.splitext(os.path.basename(path))[0]
    return _finish(model, spec), args, _safe_name(f"{stem}-{factory_name}")


def _import_path(path: str):
    path = os.path.abspath(path)
    # A name unique to the path, registered in sys.modules so dataclasses and pickling in the
    # user's file can find their own module.
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"moec_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"cannot import '{path}': it must be a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise SpecError(f"importing '{path}' raised {_one_line(e)}: fix the file") from None
    return module


def _call_factory(factory, spec: str):
    try:
        return factory()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise SpecError(f"{spec}: the factory raised {_one_line(e)}: fix the factory") from None


def _split_result(result, spec: str) -> tuple[nn.Module, tuple | None]:
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, example = result
        return model, tuple(example) if isinstance(example, (tuple, list)) else (example,)
    raise SpecError(f"{spec} returned {type(result).__name__}: return a model, (model, example_input) or (model, tuple_of_args)")


def _make_example(model: nn.Module, spec: str) -> tuple:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return (torch.randint(0, vocab, (1, EXAMPLE_TOKENS)),)
    linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if linear is not None:
        return (torch.randn(1, EXAMPLE_TOKENS, linear.in_features, dtype=linear.weight.dtype,
                            device=linear.weight.device),)
    raise SpecError(f"{spec} returned only a model and moec cannot guess its input: return (model, example_input)")


def _finish(model: nn.Module, spec: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    # Benchmarks and capture want inference behaviour: no dropout, no router jitter.
    return model.eval()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def _one_line(e: BaseException, with_type: bool = True) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}" if with_type else text
