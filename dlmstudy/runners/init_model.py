"""`dlmstudy init-model`: a model folder with a real config, random weights and a tokenizer that fits it.

The folder loads as the downloaded release would (`dlmstudy run` with `sft.base`, `generate`, `chat`,
`merge-lora`, `eval`, plain transformers for Qwen2), so a machine can be smoke-tested for loading,
memory and speed before the weights are downloaded. The weights are random: nothing it says is
about quality.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from dlmstudy.data.tokenizer import byte_tokenizer, complete_tokenizer
from dlmstudy.errors import UserError
from dlmstudy.models.params import config_from_json
from dlmstudy.models.random_init import model_config_path, parse_dtype, write_random_folder
from dlmstudy.runners.device import resolve_device


def fitting_tokenizer(config: PretrainedConfig, path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer in `path` (completed with what an arm needs: eos, pad, mask, chat template), refused if it has
    ids beyond the model's rows; without a path, a byte-level tokenizer with the config's special ids."""
    rows = config.vocab_size
    if path is not None:
        try:
            tokenizer = complete_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=False))
        except (OSError, ValueError) as err:
            raise UserError(f"--tokenizer {path}: not a loadable tokenizer folder ({err})") from None
        if len(tokenizer) > rows:
            raise UserError(f"--tokenizer {path}: {len(tokenizer):,} ids do not fit the model's {rows:,} "
                            "embedding rows")
        return tokenizer
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is None:
        raise UserError("the config names no eos_token_id; pass --tokenizer")
    return byte_tokenizer(getattr(config, "llada_vocab_size", rows), eos_token_id=eos,
                          pad_token_id=config.pad_token_id, mask_token_id=getattr(config, "mask_token_id", None))


def init_model(config: str | Path, out: str | Path, *, dtype: str = "bf16", shard_size: str = "5GB",
               device: str = "auto", seed: int = 0, tokenizer: str | Path | None = None,
               progress: Callable[[str], None] = print) -> Path:
    """Write the folder for `config` (a shipped name such as llada-8b, or a config.json) to `out`; returns `out`."""
    path = model_config_path(config)
    fitted = fitting_tokenizer(config_from_json(path), tokenizer)
    return write_random_folder(path, out, dtype=parse_dtype(dtype), shard_size=shard_size,
                               device=resolve_device(device), seed=seed, tokenizer=fitted, progress=progress)
