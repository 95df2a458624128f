"""load_spec: every SPEC form loads a runnable model, and every mistake is one SpecError line."""

import textwrap

import pytest
import torch

from moec.models.spec import SpecError, load_spec, parse_overrides


def write(tmp_path, body: str, name: str = "factory.py") -> str:
    path = tmp_path / name
    path.write_text("import torch\nfrom torch import nn\n" + textwrap.dedent(body))
    return str(path)


def spec_error(spec: str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    message = str(info.value)
    assert "\n" not in message and message, message
    return message


# --- builtin: --------------------------------------------------------------------------------

def test_builtin_default_runs():
    from moec.models.builtin import BUILTIN_MODELS, DEFAULT_BUILTIN

    assert DEFAULT_BUILTIN in BUILTIN_MODELS
    model, args, name = load_spec(f"builtin:{DEFAULT_BUILTIN}")
    assert name == DEFAULT_BUILTIN and isinstance(args, tuple)
    assert not model.training
    with torch.no_grad():
        model(*args)


def test_unknown_builtin_lists_known_ones():
    from moec.models.builtin import BUILTIN_MODELS

    message = spec_error("builtin:no_such_model")
    assert "no_such_model" in message
    for name in BUILTIN_MODELS:
        assert name in message


def test_builtin_with_size_overrides():
    from moec.models.builtin import BUILTIN_MODELS

    model, (x,), name = load_spec("builtin:stacked-bmm:hidden=32,intermediate=48,num_layers=3,num_experts=4,top_k=3")
    assert x.shape == (2, 8, 32) and len(model.layers) == 3 and name.startswith("stacked-bmm-hidden32")
    moe = model.layers[0].moe
    assert moe.w_in_EHI.shape == (4, 32, 48) and moe.top_k == 3
    same, (y,) = BUILTIN_MODELS["stacked-bmm"](hidden=32, intermediate=48, num_layers=3, num_experts=4, top_k=3)
    assert torch.equal(x, y) and all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    with torch.no_grad():
        assert model(x).shape == x.shape


@pytest.mark.parametrize("spec, words", [
    ("builtin:moe-mlp:width=3", ["width", "hidden", "num_layers"]),
    ("builtin:moe-mlp:hidden=0", ["hidden", "positive"]),
    ("builtin:moe-mlp:hidden=big", ["hidden", "positive"]),
    ("builtin:moe-mlp:top_k=9", ["top_k", "num_experts"]),
    ("builtin:moe-mlp:hidden", ["key=value"]),
])
def test_bad_builtin_overrides(spec, words):
    message = spec_error(spec)
    assert all(w in message for w in words), message


# --- hf: -------------------------------------------------------------------------------------

def test_hf_mixtral_with_overrides():
    model, args, name = load_spec("hf:mixtral:num_hidden_layers=1,num_local_experts=3")
    assert name == "hf-mixtral"
    assert model.config.num_hidden_layers == 1 and model.config.num_local_experts == 3
    with torch.no_grad():
        model(*args)


def test_hf_unknown_arch_lists_known_ones():
    from moec.models.hf import HF_ARCHS

    message = spec_error("hf:no_such_arch")
    assert "no_such_arch" in message and "mixtral" in message
    assert all(arch in message for arch in HF_ARCHS)


def test_hf_unknown_override_key():
    assert "no_such_key" in spec_error("hf:mixtral:no_such_key=3")


def test_hf_bad_experts_implementation():
    message = spec_error("hf:mixtral:experts=fast")
    assert "grouped_mm" in message and "fast" in message


@pytest.mark.parametrize("options, expected", [
    ("num_hidden_layers", "key=value"), ("=3", "key=value"), ("a=1,,b=2", "key=value"), ("a=", "key=value"),
    ("a=1,a=2", "twice"),
])
def test_bad_key_value(options, expected):
    with pytest.raises(SpecError, match=expected):
        parse_overrides(options)


def test_parse_overrides_types():
    assert parse_overrides("a=1,b=0.5,c=true,d=False,e=silu,f=1e-6") == {
        "a": 1, "b": 0.5, "c": True, "d": False, "e": "silu", "f": 1e-6}
    assert parse_overrides("") == {}


# --- path/to/file.py:factory -----------------------------------------------------------------

def test_file_factory_returning_model_and_args(tmp_path):
    path = write(tmp_path, """
        def make():
            return nn.Bilinear(4, 4, 2), (torch.randn(3, 4), torch.randn(3, 4))
    """)
    model, args, name = load_spec(f"{path}:make")
    assert name == "factory-make" and len(args) == 2
    assert model(*args).shape == (3, 2)


def test_file_factory_returning_model_and_one_input(tmp_path):
    path = write(tmp_path, """
        def make():
            return nn.Linear(4, 2), torch.randn(3, 4)
    """)
    model, args, _ = load_spec(f"{path}:make")
    assert len(args) == 1 and model(*args).shape == (3, 2)


def test_bare_model_gets_hidden_states_from_first_linear(tmp_path):
    path = write(tmp_path, """
        def make():
            return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    """)
    model, (x,), _ = load_spec(f"{path}:make")
    assert x.shape == (1, 16, 8) and x.dtype == torch.float32
    model(x)


def test_bare_model_with_vocab_size_gets_input_ids(tmp_path):
    path = write(tmp_path, """
        class Config:
            vocab_size = 50

        class LM(nn.Module):
            config = Config()

            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(50, 8)
                self.head = nn.Linear(8, 50)

            def forward(self, ids):
                return self.head(self.embed(ids))

        def make():
            return LM()
    """)
    model, (ids,), _ = load_spec(f"{path}:make")
    assert ids.shape == (1, 16) and not ids.is_floating_point() and int(ids.max()) < 50
    model(ids)


def test_bare_model_without_linear_is_an_error(tmp_path):
    path = write(tmp_path, """
        def make():
            return nn.ReLU()
    """)
    assert "example_input" in spec_error(f"{path}:make")


def test_factory_returning_something_else(tmp_path):
    path = write(tmp_path, """
        def make():
            return 42
    """)
    assert "int" in spec_error(f"{path}:make")


def test_missing_file(tmp_path):
    message = spec_error(f"{tmp_path}/absent.py:make")
    assert "absent.py" in message and "no such file" in message


def test_missing_factory_lists_functions(tmp_path):
    path = write(tmp_path, """
        def build():
            return nn.Linear(2, 2)
    """)
    message = spec_error(f"{path}:make")
    assert "'make'" in message and "build" in message


def test_factory_raising_names_the_exception(tmp_path):
    path = write(tmp_path, """
        def make():
            raise RuntimeError("out of\\nexperts")
    """)
    message = spec_error(f"{path}:make")
    assert "RuntimeError: out of experts" in message


def test_file_that_fails_to_import(tmp_path):
    path = write(tmp_path, "import no_such_module_for_moec\n")
    assert "ModuleNotFoundError" in spec_error(f"{path}:make")


def test_py_file_without_factory(tmp_path):
    path = write(tmp_path, "")
    assert ":FACTORY" in spec_error(path)


@pytest.mark.parametrize("spec", ["nope:x", "", "mixtral", "file.txt:make"])
def test_unknown_forms(spec):
    assert "builtin:NAME" in spec_error(spec)
