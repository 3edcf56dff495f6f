"""lm_eval models for both arms, loaded from dlmstudy checkpoints, registered under these names:

`dlmstudy`: the checkpoint's arm decides (diffusion or AR).
`dlmstudy_mdm` (alias `llada`, the name dllm registers): the diffusion arm. loglikelihood and
loglikelihood_rolling through LLaDA's Monte-Carlo bound (`mdm_loglikelihood`), generate_until through
LLaDA's sampler.
`dlmstudy_ar`: AR arms through lm_eval's own HFLM wrapping our loaded model.

Model arguments follow the tutorial: `pretrained=PATH,mc_num=1,max_length=1024,steps=256,
block_size=64,cfg=0.0` (block_size = block_length, cfg = cfg_scale, max_new_tokens = gen_length,
is_check_greedy = check_greedy). lm_eval's own `batch_size`, `max_batch_size` and `device` are
accepted as its CLI passes them: `batch_size=auto` takes `max_batch_size` (no memory probing).
Diffusion-only arguments on an AR checkpoint are refused. Under `accelerate launch` each process
becomes one data-parallel rank: lm_eval's evaluator splits the requests by rank and gathers the
results on rank 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch
import torch.distributed
from accelerate import Accelerator, PartialState
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlmstudy.errors import UserError
from dlmstudy.evaluation.likelihood import mdm_loglikelihood
from dlmstudy.models.checkpoints import META_FILE, load_checkpoint, read_arm
from dlmstudy.runners.device import DEVICES, resolve_device
from dlmstudy.sampling import generate

log = logging.getLogger(__name__)

ALIASES = {"block_size": "block_length", "cfg": "cfg_scale", "max_new_tokens": "gen_length",
           "is_check_greedy": "check_greedy"}
DIFFUSION_NAMES = ("dlmstudy_mdm", "llada")
AR_NAMES = ("dlmstudy_ar",)
# generate_until keys of lm_eval tasks and --gen_kwargs that the diffusion sampler honours (do_sample: lm_eval's
# default on every request, needless here)
DIFFUSION_GEN_KWARGS = ("until", "max_gen_toks", "temperature", "do_sample")


@dataclass
class DiffusionEvalArgs:
    """Model arguments of the diffusion arm.

    mc_num Monte-Carlo draws per likelihood, `batch_size` rows per forward pass (likelihood draws,
    or prompts when generating); max_length caps prompt + answer tokens. Generation: gen_length
    (default: the task's max_gen_toks) is rounded up to whole blocks of block_length (default:
    gen_length, pure diffusion); steps (default: gen_length) up to a whole number per block.
    threshold and use_cache are the sampler's Fast-dLLM options (parallel decoding, prefix KV cache);
    check_greedy computes lm_eval's is_greedy by decoding the answer one token per step.
    """

    mc_num: int = 128
    batch_size: int = 32
    max_length: int = 1024
    steps: int | None = None
    gen_length: int | None = None
    block_length: int | None = None
    cfg_scale: float = 0.0
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    use_cache: bool = False
    check_greedy: bool = False


@dataclass
class AREvalArgs:
    """Model arguments of an AR arm; gen_length is the max_gen_toks used when a task sets none."""

    batch_size: int = 16
    max_length: int | None = None
    gen_length: int | None = None


DIFFUSION_ONLY = sorted({f.name for f in fields(DiffusionEvalArgs)} - {f.name for f in fields(AREvalArgs)})


def split_model_args(model_args: str | dict[str, Any] | None) -> dict[str, Any]:
    """`key=value,...` (or a dict) into a dict, keys as given."""
    if isinstance(model_args, dict):
        return dict(model_args)
    raw = {}
    for part in filter(None, (model_args or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UserError(f"model_args: expected key=value, got {part!r}")
        raw[key.strip()] = lm_utils.handle_arg_string(value)
    return raw


def parse_model_args(model_args: str | dict[str, Any] | None) -> dict[str, Any]:
    """`key=value,...` (or a dict) into a dict with the tutorial's aliases resolved to our names."""
    args: dict[str, Any] = {}
    for key, value in split_model_args(model_args).items():
        name = ALIASES.get(key, key)
        if name in args and args[name] != value:
            raise UserError(f"model_args: {key}={value} conflicts with {name}={args[name]}")
        args[name] = value
    return args


def for_sampler(model_args: str | dict[str, Any] | None, sampler: str) -> dict[str, Any]:
    """A study's model_args for one run: the diffusion-only ones reach diffusion runs only."""
    raw = split_model_args(model_args)
    return raw if sampler == "diffusion" else {k: v for k, v in raw.items() if ALIASES.get(k, k) not in DIFFUSION_ONLY}


def _batch_size(args: dict[str, Any], default: int) -> dict[str, Any]:
    """lm_eval's batch_size (an int, a digit string, `auto` or `auto:N`) and max_batch_size as one int:
    `auto` takes max_batch_size, else the arm's default."""
    args = dict(args)
    cap = args.pop("max_batch_size", None)
    size = args.get("batch_size")
    if isinstance(size, str) and size.startswith("auto"):
        args["batch_size"] = cap if cap is not None else default
    elif isinstance(size, str) and size.isdigit():
        args["batch_size"] = int(size)
    return args


def _model_args(raw: dict[str, Any], config: type, arm: str):
    """`config` built from the args it knows, types checked; diffusion-only args on an AR arm are refused."""
    typed = {ALIASES.get(k, k): k for k in raw}  # our name -> the name the user gave
    args = _batch_size(parse_model_args(raw), config.batch_size)
    hints = get_type_hints(config)
    diffusion = get_type_hints(DiffusionEvalArgs)
    unknown = sorted(typed.get(k, k) for k in set(args) - set(hints) - set(diffusion))
    if unknown:
        known = ", ".join(sorted(set(hints) | set(diffusion) | set(ALIASES) | {"max_batch_size"}))
        raise UserError(f"model_args: unknown argument(s) {', '.join(unknown)}; known: {known}")
    foreign = sorted(typed.get(k, k) for k in set(args) - set(hints))
    if foreign:
        raise UserError(f"model_args {', '.join(foreign)} only apply to diffusion checkpoints; this checkpoint "
                        f"(arm {arm}) decodes autoregressively")
    own = dict(args)
    for key, value in own.items():
        allowed = get_args(hints[key]) or (hints[key],)
        if float in allowed and type(value) is int:
            own[key] = value = float(value)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise UserError(f"model_args: {typed.get(key, key)}={value!r} is not a valid "
                            f"{' or '.join(t.__name__ for t in allowed)}")
        if type(value) is int and value < 1:  # every integer argument is a count
            raise UserError(f"model_args: {typed.get(key, key)} must be >= 1, got {value}")
    return config(**own)


def _device(device: str | torch.device | None) -> str:
    """A device name: auto/cpu/cuda/npu resolved as dlmstudy does; lm_eval's `cuda:1` and the like as given."""
    device = "auto" if device is None else str(device)
    return resolve_device(device) if device in DEVICES else device


def _launch_state(device: str | torch.device) -> PartialState:
    """accelerate's view of this process (cpu=True lets a CPU launch run as several gloo processes)."""
    return PartialState(cpu=torch.device(device).type == "cpu")


def process_device(device: str | torch.device) -> torch.device:
    """This process's device: the rank's device under `accelerate launch` / torchrun, else `device`."""
    state = _launch_state(device)
    return state.device if state.num_processes > 1 else torch.device(device)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or `<run>/checkpoint` of a finished run folder (one with result.json)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    if (path / "result.json").exists():
        if not (path / "checkpoint" / META_FILE).exists():
            raise UserError(f"{path}: finished run without a checkpoint/ folder")
        return path / "checkpoint"
    if (path / "run.json").exists():
        raise UserError(f"{path}: run is not finished (no result.json), so it has no final checkpoint")
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    raise UserError(f"{path}: neither a dlmstudy checkpoint (no {META_FILE}) nor a finished run folder "
                    "(no result.json)")


def _arm_name(pretrained, sampler: str, arm: str | None) -> str:
    """The arm of a checkpoint or run folder, checked to decode with `sampler`; `arm` (or the sampler) for an object."""
    if not isinstance(pretrained, (str, Path)):
        return arm or sampler
    path = resolve_checkpoint(pretrained)
    found = read_arm(path)
    if found.sampler != sampler:
        names = " or ".join(DIFFUSION_NAMES if found.sampler == "diffusion" else AR_NAMES)
        raise UserError(f"{path} (arm {found.name}) decodes with the {found.sampler} sampler, not {sampler}: "
                        f"use the lm_eval model dlmstudy or {names}")
    return found.name


def _load(pretrained, tokenizer, device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a checkpoint or run folder, or the given pair."""
    if isinstance(pretrained, (str, Path)):
        model, tokenizer, _ = load_checkpoint(resolve_checkpoint(pretrained), device=str(process_device(device)))
        return model, tokenizer
    if tokenizer is None:
        raise ValueError("a model passed as an object needs its tokenizer")
    return pretrained, tokenizer


def _join_processes(lm, device: torch.device) -> None:
    """Under a launcher, make `lm` one data-parallel rank (HFLM's gather and barrier use .accelerator)."""
    state = _launch_state(device)
    if state.num_processes > 1:
        lm.accelerator = Accelerator(cpu=device.type == "cpu")
        lm._rank, lm._world_size = state.process_index, state.num_processes


@register_model(*DIFFUSION_NAMES)
class DiffusionLM(TemplateLM):
    """The diffusion arm for lm_eval: likelihoods through the ELBO, generation through LLaDA's sampler."""

    def __init__(self, pretrained: str | Path | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 *, device: str | None = "auto", arm: str | None = None, **model_args: Any) -> None:
        super().__init__()
        device = _device(device)
        self.args = _model_args(model_args, DiffusionEvalArgs, _arm_name(pretrained, "diffusion", arm))
        self.model, self.tokenizer = _load(pretrained, tokenizer, device)
        self._warned: set[str] = set()
        self.mask_id = getattr(self.model.config, "mask_token_id", None)
        if self.mask_id is None:
            self.mask_id = self.tokenizer.mask_token_id
        if self.mask_id is None:
            raise UserError("the diffusion model has no mask token (config.mask_token_id or tokenizer.mask_token)")
        self._device = next(self.model.parameters()).device
        _join_processes(self, self._device)

    # -- tokens --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Context for an empty prompt: BOS when the tokenizer has one, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    # -- likelihoods ---------------------------------------------------------------------------
    def _log_likelihood(self, context: list[int], continuation: list[int]) -> float:
        """The bound on log p(continuation | context), keeping the context's last tokens within max_length."""
        room = self.args.max_length - len(continuation)
        if room < 0:
            raise UserError(f"a continuation of {len(continuation)} tokens exceeds max_length={self.args.max_length}")
        context = context[len(context) - room:] if room < len(context) else context
        return mdm_loglikelihood(self.model, context, continuation, mask_id=self.mask_id, mc_num=self.args.mc_num,
                                 batch_size=self.args.batch_size, cfg_scale=self.args.cfg_scale)

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Whether LLaDA's sampler, one token per step at temperature 0, decodes exactly the continuation."""
        n = len(continuation)
        prompt = torch.tensor([context], device=self.device)
        out = generate(self.model, prompt, steps=n, gen_length=n, block_length=n, mask_id=self.mask_id)
        return out[0, len(context):].tolist() == continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for pair, context, continuation in tqdm(requests, desc="mdm loglikelihood", disable=disable_tqdm or self.rank != 0):
            result = (self._log_likelihood(context, continuation),
                      self.args.check_greedy and self._is_greedy(context, continuation))
            self.cache_hook.add_partial("loglikelihood", pair, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Bound on log p(text | BOS/EOS), in lm_eval's disjoint rolling windows of max_length tokens."""
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="mdm rolling", disable=disable_tqdm or self.rank != 0):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.args.max_length - 1, context_len=1))
            total = sum(self._log_likelihood(context, continuation) for context, continuation in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation ----------------------------------------------------------------------------
    def _plan(self, max_gen_toks: int | None) -> tuple[int, int, int]:
        """(gen_length, block_length, steps) with gen_length whole blocks and steps a multiple of the blocks."""
        a = self.args
        gen_length = a.gen_length or max_gen_toks or 128
        block_length = min(a.block_length or gen_length, gen_length)
        blocks = -(-gen_length // block_length)
        steps = -(-(a.steps or gen_length) // blocks) * blocks
        return blocks * block_length, block_length, steps

    def _decode(self, tokens: list[int], until: list[str]) -> str:
        """Text up to the first special token (EOS, end of turn, ...) and the first stop string."""
        special = set(self.tokenizer.all_special_ids)
        cut = next((i for i, t in enumerate(tokens) if t in special), len(tokens))
        text = self.tokenizer.decode(tokens[:cut])
        for stop in until:
            if stop:
                text = text.split(stop, 1)[0]
        return text

    def _temperature(self, gen_kwargs: dict[str, Any]) -> float:
        """The sampling temperature of a request: the task's (or --gen_kwargs') temperature, else model_args'.
        Keys the sampler has no use for are logged once (do_sample, which lm_eval sets on every request, is
        not needed: temperature 0 is greedy)."""
        unused = sorted(set(gen_kwargs) - set(DIFFUSION_GEN_KWARGS) - self._warned)
        if unused:
            log.warning("gen_kwargs %s are not used by the diffusion sampler (it honours %s)", ", ".join(unused),
                        ", ".join(DIFFUSION_GEN_KWARGS[:3]))
            self._warned.update(unused)
        return float(gen_kwargs.get("temperature", self.args.temperature))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """LLaDA sampling; prompts are batched only with prompts of equal length, so no padding enters."""
        groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or [self.tokenizer.eos_token]
            until = [until] if isinstance(until, str) else list(until)
            plan = self._plan(gen_kwargs.get("max_gen_toks"))
            room = self.args.max_length - plan[0]
            if room < 1:
                raise UserError(f"gen_length {plan[0]} leaves no room for the prompt within max_length={self.args.max_length}")
            ids = (self.tok_encode(context) or [self.prefix_token_id])[-room:]
            groups.setdefault((len(ids), plan, self._temperature(gen_kwargs)), []).append((i, ids, until))
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="mdm generate", disable=disable_tqdm or self.rank != 0)
        for (n, (gen_length, block_length, steps), temperature), items in groups.items():
            for s in range(0, len(items), self.args.batch_size):
                chunk = items[s:s + self.args.batch_size]
                prompt = torch.tensor([ids for _, ids, _ in chunk], device=self.device)
                x = generate(self.model, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                             temperature=temperature, cfg_scale=self.args.cfg_scale,
                             remasking=self.args.remasking, mask_id=self.mask_id, threshold=self.args.threshold,
                             use_cache=self.args.use_cache)
                for (i, _, until), row in zip(chunk, x[:, n:].tolist()):
                    out[i] = self._decode(row, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    # -- data parallel (as HFLM) ---------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()


@register_model(*AR_NAMES)
class ARLM(HFLM):
    """An AR arm for lm_eval: HFLM around our loaded model, joined to `accelerate launch` ranks."""

    def __init__(self, pretrained: str | Path | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 *, device: str | None = "auto", arm: str | None = None, **model_args: Any) -> None:
        device = _device(device)
        args = _model_args(model_args, AREvalArgs, _arm_name(pretrained, "ar", arm))
        model, tokenizer = _load(pretrained, tokenizer, device)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal",
                         batch_size=args.batch_size, max_length=args.max_length)
        self.gen_length = args.gen_length
        _join_processes(self, self._device)

    @property
    def max_gen_toks(self) -> int:
        return self.gen_length or super().max_gen_toks


def load_lm(checkpoint: str | Path, model_args: str | dict[str, Any] | None = None, *,
            device: str | None = "auto") -> TemplateLM:
    """The lm_eval model for a checkpoint or finished run: DiffusionLM or ARLM according to its arm's sampler."""
    args = split_model_args(model_args)
    args.pop("pretrained", None)
    cls = DiffusionLM if read_arm(resolve_checkpoint(checkpoint)).sampler == "diffusion" else ARLM
    return cls(str(checkpoint), device=device, **args)


@register_model("dlmstudy")
class CheckpointLM(LM):
    """The lm_eval model `dlmstudy`: DiffusionLM or ARLM, as the checkpoint's arm decodes (never instantiated)."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> LM:
        args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        if args.get("pretrained") is None:
            raise UserError("model_args: pretrained=PATH (a dlmstudy checkpoint or finished run folder) is required")
        return load_lm(args.pop("pretrained"), args, device=args.pop("device", "auto"))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> LM:
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)
