"""A Hugging Face Marian model (Helsinki-NLP/opus-mt-*, Tatoeba "tc" models) as a jaxformer export directory.

    import_marian("Helsinki-NLP/opus-mt-en-de", "models/en-de")   # a Hub id (huggingface_hub.snapshot_download)
    import_marian("path/to/opus-mt-en-de", "models/en-de")         # a local transformers-layout directory

The source holds config.json, model.safetensors (or a sharded index, or pytorch_model.bin, read with
`torch.load(weights_only=True)`: no pickled code runs), source.spm, target.spm and vocab.json. The result
is an ordinary jaxformer export (`jaxformer.load`, translate, evaluate, plot-attention, fine-tuning,
`export --format marian|ctranslate2`) whose model options say what Marian is: `activation` from
config.json (MarianConfig's default is gelu; opus-mt files say swish), `logits_bias` (final_logits_bias),
`layer_norm_epsilon` 1e-5, `sinusoid_layout` "halves", `attention_bias`, `scale_embeddings`, `max_len` =
max_position_embeddings. Its vocabulary is a `MarianVocab` (jaxformer/data/marian_vocab.py), which
tokenizes as MarianTokenizer does and remaps ids so that PAD 0, UNK 1, BOS 2, EOS 3 hold.

Every problem is one line naming the file or key (`MarianFormatError`), and the export is written into a
temporary folder and renamed, so `out_dir` never holds half a model.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from jaxformer import layout
from jaxformer.data.common import DataError
from jaxformer.data.marian_vocab import MarianVocab
from jaxformer.io import params as params_io
from jaxformer.io.marian_layout import (DECODER_EMBED, ENCODER_EMBED, LM_HEAD, POSITION_KEYS, SHARED,
                                        MarianFormatError, embedding_sources, from_marian, marian_shape,
                                        parameter_map, transformer_config)
from jaxformer.staging import check_output_dir

__all__ = ["import_marian", "read_marian", "resolve_source", "MarianFormatError"]

log = logging.getLogger(__name__)

HUB_FILES = ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
             "source.spm", "target.spm", "vocab.json", "target_vocab.json", "model.safetensors",
             "model.safetensors.index.json", "model-*.safetensors", "pytorch_model.bin"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str | os.PathLike) -> pathlib.Path:
    """A local directory as it is; a Hub id ("owner/name") fetched into the Hugging Face cache."""
    path = pathlib.Path(source)
    if path.exists():
        if not path.is_dir():
            raise MarianFormatError(f"{path} is a file; give a directory in the transformers layout or a Hub id")
        return path
    if not _HUB_ID.match(str(source)):
        raise MarianFormatError(f"{source} does not exist (give a local directory or a Hub id such as "
                                f"Helsinki-NLP/opus-mt-en-de)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise MarianFormatError(f"fetching {source} from the Hub needs huggingface_hub: pip install huggingface_hub "
                                f"(or give a local directory)") from e
    try:
        return pathlib.Path(snapshot_download(str(source), allow_patterns=HUB_FILES, etag_timeout=10))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
        raise MarianFormatError(f"cannot fetch {source}: {why} and it is not in the local Hugging Face cache; "
                                f"download it where the Hub is reachable and give its directory") from e
    except (HfHubHTTPError, OSError) as e:
        raise MarianFormatError(f"cannot fetch {source} from the Hugging Face Hub: {str(e).splitlines()[0]}") from e


# ------------------------------------------------------------------------------------------------ reading

def _json(path: pathlib.Path, what: str) -> dict:
    if not path.is_file():
        raise MarianFormatError(f"{path} is missing: {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarianFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise MarianFormatError(f"{path} must hold a JSON object")
    return value


def _token(value: Any, default: str) -> str:
    if isinstance(value, Mapping):
        value = value.get("content")
    return str(value) if value else default


def read_vocabulary(directory: pathlib.Path, marian: Mapping[str, Any]) -> MarianVocab:
    """MarianTokenizer's files as a MarianVocab, checked against config.json's special ids."""
    tok = _json(directory / "tokenizer_config.json", "") if (directory / "tokenizer_config.json").is_file() else {}
    if tok.get("separate_vocabs") or (directory / "target_vocab.json").is_file():
        raise MarianFormatError(f"{directory}: separate source and target vocabularies (separate_vocabs, "
                                f"target_vocab.json) are not supported")
    for name in ("vocab.json", "source.spm", "target.spm"):
        if not (directory / name).is_file():
            raise MarianFormatError(f"{directory / name} is missing: a Marian model needs vocab.json, source.spm "
                                    f"and target.spm beside its weights")
    vocab = _json(directory / "vocab.json", "")
    specials = {"eos_token": _token(tok.get("eos_token"), "</s>"), "unk_token": _token(tok.get("unk_token"), "<unk>"),
                "pad_token": _token(tok.get("pad_token"), "<pad>")}
    extra = [_token(t, "") for t in tok.get("additional_special_tokens") or []]
    extra += [_token(t, "") for t in (tok.get("added_tokens_decoder") or {}).values()]
    extra = sorted({t for t in extra if t and t not in specials.values()})
    unknown = [t for t in extra if t not in vocab]
    if unknown:
        raise MarianFormatError(f"{directory / 'tokenizer_config.json'}: added tokens {unknown[:5]} are not in "
                                f"vocab.json; added vocabulary is not supported")
    try:
        mv = MarianVocab((directory / "source.spm").read_bytes(), (directory / "target.spm").read_bytes(), vocab,
                         extra_special_tokens=extra, path=str(directory), **specials)
    except DataError as e:
        raise MarianFormatError(str(e)) from e
    where = directory / "config.json"
    ids = mv.ids
    for key, value in (("eos_token_id", ids.eos), ("pad_token_id", ids.pad), ("decoder_start_token_id", ids.pad)):
        given = marian.get(key)
        if isinstance(given, list) and len(given) == 1:
            given = given[0]
        if given is not None and int(given) != value:
            raise MarianFormatError(f"{where}: {key}={given} but vocab.json gives "
                                    f"{'</s>' if key == 'eos_token_id' else specials['pad_token']} the id {value} "
                                    f"(the decoder must start from pad, as Marian's does)")
    if int(marian.get("vocab_size", ids.marian_size)) != ids.marian_size:
        raise MarianFormatError(f"{where}: vocab_size={marian['vocab_size']} but vocab.json has {ids.marian_size} "
                                f"pieces")
    return mv


def read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """The state dict as float32 numpy arrays, from safetensors (single or sharded) or a torch .bin."""
    single, index, torch_bin = (directory / "model.safetensors", directory / "model.safetensors.index.json",
                                directory / "pytorch_model.bin")
    if single.is_file():
        weights = _read_safetensors(single)
    elif index.is_file():
        shards = sorted(set(_json(index, "").get("weight_map", {}).values()))
        if not shards:
            raise MarianFormatError(f"{index} has no weight_map")
        weights = {}
        for shard in shards:
            weights.update(_read_safetensors(directory / shard))
    elif torch_bin.is_file():
        weights = _read_torch(torch_bin)
    else:
        raise MarianFormatError(f"{directory} has no weights: neither model.safetensors (or its index) nor "
                                f"pytorch_model.bin")
    # A MarianModel (no LM head) saves its keys without the "model." prefix.
    return {(k if k.startswith(("model.", "final_logits_bias", "lm_head")) else f"model.{k}"): v
            for k, v in weights.items()}


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MarianFormatError(f"{path} is missing (named by the safetensors index)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except SafetensorError as e:
        raise MarianFormatError(f"{path} is not a readable safetensors file ({e}); it may be truncated: "
                                f"download it again") from e
    except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy lacks: read it through torch
        try:
            import torch  # noqa: F401
        except ImportError:
            raise MarianFormatError(f"{path}: {e}; reading it needs torch (pip install -e '.[interop]')") from e
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).float().numpy() for k in f.keys()}


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise MarianFormatError(f"{path} is a torch file; reading it needs torch (pip install -e '.[interop]'), "
                                f"or convert it to model.safetensors") from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types (UnpicklingError, RuntimeError, EOFError)
        raise MarianFormatError(f"{path} cannot be read as a torch state dict with weights_only=True "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, Mapping) or not all(hasattr(v, "numpy") for v in state.values()):
        raise MarianFormatError(f"{path} does not hold a state dict of tensors")
    return {str(k): v.detach().float().numpy() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ mapping

def marian_params(config, weights: Mapping[str, np.ndarray], sources: tuple[str, str, str | None],
                  vocab: MarianVocab, where: pathlib.Path) -> dict:
    """jaxformer's {"params": ...} tree (numpy) from a Marian state dict, every key accounted for; `sources`
    are the keys of the encoder embedding, decoder embedding and untied output layer (`embedding_sources`)."""
    from jaxformer.model import sinusoidal_positions

    expected = layout.shapes(config)
    order, h = np.arange(config.d_model), config.num_heads  # imported models keep Marian's halves layout
    used: set[str] = set()
    flat: dict[str, np.ndarray] = {}

    def take(key: str, path: str, kind: str) -> np.ndarray:
        want = marian_shape(kind, expected[path])
        if key not in weights:
            raise MarianFormatError(f"{where}: weight {key} is missing (config.json describes a model that has it)")
        if tuple(weights[key].shape) != want:
            raise MarianFormatError(f"{where}: weight {key} has shape {tuple(weights[key].shape)} but config.json "
                                    f"implies {want}")
        used.add(key)
        return weights[key]

    for path, key, kind in parameter_map(config):
        flat[path] = from_marian(kind, take(key, path, kind), order, h)
    ids = vocab.ids
    encoder, decoder, output = sources
    source, target = layout.embeddings(config)
    for path, key in [(source, encoder)] + ([(target, decoder)] if target != source else []):
        flat[path] = ids.rows_to_ours(from_marian("embedding", take(key, path, "embedding"), order, h))
    if output is not None:
        flat[layout.OUTPUT] = from_marian("output", ids.rows_to_ours(take(output, layout.OUTPUT, "output")), order, h)
    bias = weights.get("final_logits_bias", np.zeros((1, ids.marian_size), np.float32))
    if bias.shape != (1, ids.marian_size):
        raise MarianFormatError(f"{where}: final_logits_bias has shape {bias.shape}, expected {(1, ids.marian_size)}")
    used.add("final_logits_bias")
    flat["final_logits_bias"] = ids.rows_to_ours(bias[0])
    for key in POSITION_KEYS:  # not needed (static), but a file whose positions are not Marian's is refused
        if key in weights:
            table = sinusoidal_positions(config.max_len, config.d_model, "halves")
            if weights[key].shape != table.shape or float(np.max(np.abs(weights[key] - table))) > 1e-4:
                raise MarianFormatError(f"{where}: {key} is not Marian's sinusoid table for max_position_embeddings="
                                        f"{config.max_len}, d_model={config.d_model}; learned positions are not "
                                        f"supported")
            used.add(key)
    # transformers ties (or, unused, ignores) the other copies of the embedding and the output layer
    left = sorted(set(weights) - used - {SHARED, ENCODER_EMBED, DECODER_EMBED, LM_HEAD})
    if left:
        raise MarianFormatError(f"{where}: weights that config.json does not describe: {', '.join(left[:4])}"
                                f"{' ...' if len(left) > 4 else ''}")
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise MarianFormatError(f"{where}: no Marian weight for {', '.join(missing[:4])}")
    return {"params": params_io.unflatten({k: v.astype(np.float32) for k, v in flat.items()})}


def read_marian(source: str | os.PathLike):
    """(TransformerConfig, {"params": ...}, MarianVocab, decode settings, languages) of a Marian model."""
    from jaxformer.model import TransformerConfig

    directory = resolve_source(source)
    marian = _json(directory / "config.json", f"{directory} is not a transformers model directory")
    vocab = read_vocabulary(directory, marian)
    weights = read_weights(directory)
    sources = embedding_sources(marian, weights)
    encoder, decoder, output = sources
    share = encoder == decoder or (encoder in weights and decoder in weights
                                   and np.array_equal(weights[encoder], weights[decoder]))
    try:
        config = TransformerConfig(**transformer_config(marian, vocab_size=vocab.vocab_size,
                                                        where=str(directory / "config.json"), share_embeddings=share,
                                                        tie_output=output is None))
    except ValueError as e:
        if isinstance(e, MarianFormatError):
            raise
        raise MarianFormatError(f"{directory / 'config.json'}: {e}") from e
    params = marian_params(config, weights, sources, vocab, directory)
    generation = (_json(directory / "generation_config.json", "")
                  if (directory / "generation_config.json").is_file() else {})
    decode = {"beam_size": int(generation.get("num_beams") or marian.get("num_beams") or 4),
              "length_penalty": float(generation.get("length_penalty", marian.get("length_penalty", 1.0)))}
    tok = _json(directory / "tokenizer_config.json", "") if (directory / "tokenizer_config.json").is_file() else {}
    languages = (tok.get("source_lang"), tok.get("target_lang"))
    return config, params, vocab, decode, languages


def import_marian(source: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write the jaxformer export directory `out_dir` (new, or an empty folder) of a Marian model."""
    from jaxformer.config import default_config
    from jaxformer.io import native
    from jaxformer.model import Transformer
    from jaxformer.translate import Translator

    out = pathlib.Path(out_dir)
    check_output_dir(out, MarianFormatError)
    config, params, vocab, decode, languages = read_marian(source)
    run_config = default_config()  # what the export keeps for `jaxformer evaluate`: the languages
    run_config.data.src_lang, run_config.data.tgt_lang = (lang or "" for lang in languages)
    translator = Translator(Transformer(config), params, vocab, decode, str(source), config=run_config)
    native.write(translator, out)  # into a temporary folder, renamed at the end
    log.info("imported %s: %d+%d layers, d_model %d, vocabulary %d (+ PAD) -> %s", source, config.num_encoder_layers,
             config.num_decoder_layers, config.d_model, vocab.ids.marian_size, out)
    return out
