"""Captions from an image-to-text model for ``controlnet-prep`` (``caption.model=<local dir>``): BLIP,
BLIP-2, GIT, Florence-2 and other ``transformers`` image-to-text models, loaded offline from a directory.

The captioning pass runs in the job's own process, one unit at a time, before the unit goes to a shard
writer: a background thread reads, decodes and preprocesses the unit's images while the model captions
the previous batch on its device; the writer then puts the captions into the shard's caption member
(``write_unit(captions=...)``), so shards keep their guarantees (temp file, rename, resume, cancel) and the
worker processes keep computing hints in parallel. One model in one process: nothing is loaded per
worker, and the model is loaded after the pool has forked (no CUDA state in the workers).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from nemo_controlnet.config import ConfigError
from nemo_controlnet.data.decode import BadSample, decode_caption, load_image
from nemo_controlnet.prep.prefetch import prefetch

log = logging.getLogger(__name__)

# Native classes first; a checkpoint with remote code (trust_remote_code) names its own in ``auto_map``.
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
REMOTE_AUTO_CLASSES = (*AUTO_CLASSES, "AutoModelForCausalLM", "AutoModelForSeq2SeqLM")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CAPTION_FAILED, CAPTION_EMPTY = "caption_failed", "caption_empty"


class CaptionSkip(NamedTuple):
    """What the writer records instead of a caption: the sample is skipped and counted by ``reason``."""

    reason: str
    detail: str


@dataclass
class _Item:
    key: str
    existing: str  # the source's caption ("" when it has none)
    inputs: Any  # the processor's output for this image alone (batch of 1), or the CaptionSkip it raised


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: SLURM's or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bf16 on a GPU that has it (fp16 on older ones), fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class Captioner:
    """``caption:`` of conf/prep.yaml. Construction reads only the model's config (a directory that is not
    an image-to-text model fails here, naming ``caption.model``); weights load on the first caption."""

    def __init__(
        self,
        model: str,
        mode: str = "missing",
        prefix: str = "",
        suffix: str = "",
        separator: str = ", ",
        prompt: str | None = None,
        keep_prompt: bool = False,
        batch_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 40,
        num_beams: int = 1,
        trust_remote_code: bool = False,
        reader_threads: int | str = "auto",
        writers: int = 0,
    ):
        """``writers``: the shard-writer processes beside this one (0: in-process), for the CPU thread count."""
        self.path = os.path.abspath(model)
        self.mode, self.prefix, self.suffix, self.separator = mode, prefix or "", suffix or "", separator or ""
        self.prompt, self.keep_prompt = prompt or None, keep_prompt
        self.batch_size, self.max_new_tokens, self.num_beams = batch_size, max_new_tokens, num_beams
        self.trust_remote_code, self.writers = trust_remote_code, writers
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config, self.model_class = self._inspect()
        self.model = self.processor = None
        self._reader_threads = reader_threads
        self.reader_threads = 1 if reader_threads == "auto" else int(reader_threads)  # auto: set by load()
        self._tokenizer_lock = threading.Lock()
        self._torch_threads: int | None = None
        self._echo = ""
        self.captioned, self.failed, self.seconds = 0, 0, 0.0

    def __repr__(self) -> str:
        return f"Captioner({self.path}, {self.config.model_type}, mode={self.mode})"

    def _error(self, why: str) -> ConfigError:
        return ConfigError(f"caption.model={self.path!r}: {why}")

    def _inspect(self):
        if not (Path(self.path) / "config.json").is_file():
            raise self._error("not a model directory (no config.json)")
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(
                self.path, local_files_only=True, trust_remote_code=self.trust_remote_code
            )
        except (OSError, ValueError, KeyError) as e:
            hint = "" if self.trust_remote_code else " (a model with its own code needs caption.trust_remote_code=true)"
            raise self._error(f"cannot read its config: {e}{hint}") from e
        auto_map = getattr(config, "auto_map", None) or {}
        for name in REMOTE_AUTO_CLASSES if self.trust_remote_code else AUTO_CLASSES:
            cls = getattr(transformers, name, None)
            if cls is None:
                continue
            if (self.trust_remote_code and name in auto_map) or type(config) in cls._model_mapping:
                if config.model_type == "florence2" and not self.prompt:  # it answers a task token, not nothing
                    raise self._error("Florence-2 needs a task: caption.prompt='<CAPTION>' (or '<DETAILED_CAPTION>', "
                                      "'<MORE_DETAILED_CAPTION>')")  # fmt: skip
                return config, cls
        raise self._error(
            f"model_type {config.model_type!r} is not an image-to-text model (none of "
            f"{', '.join(AUTO_CLASSES)} takes it); use a captioning model such as BLIP, BLIP-2, GIT or Florence-2"
        )

    def describe(self) -> dict:
        """What the manifest records (and a resume compares): the model and everything that shapes a caption."""
        raw = json.loads((Path(self.path) / "config.json").read_text())
        shaping = ("mode", "prefix", "suffix", "separator", "prompt", "keep_prompt", "max_new_tokens", "num_beams")
        model = {"model": self.path, "model_type": self.config.model_type,
                 "name_or_path": raw.get("_name_or_path") or None,
                 "architectures": raw.get("architectures")}  # fmt: skip
        return {**model, **{k: getattr(self, k) for k in shaping}, "dtype": self.dtype}

    # ---- what a sample's caption becomes -------------------------------------------------------------

    def wants(self, existing: str | None) -> bool:
        """Whether a sample with this caption (None: one that cannot be decoded) gets a generated one."""
        if self.mode == "overwrite":
            return True
        if existing is None:  # not UTF-8: kept, so the writer skips it as it always has
            return False
        return self.mode == "prefix" or not existing

    def compose(self, generated: str, existing: str) -> str:
        """``<prefix><generated><suffix>``; mode=prefix puts it before the existing caption (``separator``)."""
        text = f"{self.prefix}{generated}{self.suffix}"
        if self.mode == "prefix" and existing:
            return f"{text}{self.separator}{existing}"
        return text

    # ---- the model ----------------------------------------------------------------------------------

    def load(self) -> None:
        import torch
        import transformers

        kwargs = {"local_files_only": True, "trust_remote_code": self.trust_remote_code}
        start = time.time()
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(self.path, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._error(f"cannot load its processor: {e}") from e
        if getattr(self.processor, "image_processor", None) is None:
            raise self._error(f"its processor ({type(self.processor).__name__}) takes no images")
        dtype = getattr(torch, DTYPES[self.dtype])
        # transformers 4.56 renamed torch_dtype to dtype (and 5.x dropped the old name)
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
        try:
            model = self.model_class.from_pretrained(self.path, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise self._error(f"cannot load the model: {e}") from e
        self.model = model.to(self.device).eval()
        if self.device == "cpu":
            self._cpu_threads(torch)
        elif self._reader_threads == "auto":  # the model waits on the readers: the CPUs the writers leave, up to 8
            self.reader_threads = max(1, min(8, available_cpus() - self.writers - 1))
        tokenizer = getattr(self.processor, "tokenizer", None)
        if self.prompt and not self.keep_prompt and tokenizer is not None:
            # The prompt as the tokenizer gives it back (case, spacing), to find it echoed in the output.
            ids = tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
            self._echo = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())
        log.info(
            "captioner %s (%s, %s) loaded in %.1fs: %.2fM parameters, %s on %s, batch %d, max %d new tokens, "
            "%d reader thread(s)",
            self.path, self.config.model_type, type(self.model).__name__, time.time() - start,
            sum(p.numel() for p in self.model.parameters()) / 1e6, self.dtype, self.device, self.batch_size,
            self.max_new_tokens, self.reader_threads,
        )  # fmt: skip

    def _cpu_threads(self, torch) -> None:
        """On the CPU the model shares the cores with the shard writers and the prefetch thread: torch
        gets what they leave (at least one), as training's ``perf.cpu_threads=auto`` does; oversubscribed
        OpenMP threads wait on each other (generation 10-20x slower on a busy 2-core machine).
        OMP_NUM_THREADS, when set, wins."""
        if os.environ.get("OMP_NUM_THREADS"):
            return
        cpus = available_cpus()
        threads = max(1, cpus - self.writers - 1)
        self._torch_threads = torch.get_num_threads()  # put back by close()
        torch.set_num_threads(threads)
        log.info("captioner on the CPU: %d torch thread(s) (%d CPUs, %d writer(s), 1 reader)",
                 threads, cpus, self.writers)  # fmt: skip

    def preprocess(self, image) -> dict:
        """One image -> the processor's tensors (a batch of 1). Called from the reader threads: with a prompt
        the processor runs its tokenizer, whose settings it changes per call (not thread-safe), so those
        calls take turns; the images' decoding stays parallel."""
        if not self.prompt:
            return self.processor(images=image, return_tensors="pt")
        with self._tokenizer_lock:
            return self.processor(images=image, text=self.prompt, return_tensors="pt")

    def generate(self, inputs: dict) -> list[str]:
        """One batch of processor outputs -> the generated texts (prompt echo removed unless keep_prompt)."""
        import torch

        dtype = getattr(torch, DTYPES[self.dtype])
        moved = {}
        for k, v in inputs.items():
            if torch.is_tensor(v):
                v = v.to(self.device)
                v = v.to(dtype) if v.is_floating_point() else v
            moved[k] = v
        with torch.inference_mode():
            out = self.model.generate(
                **moved, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
        decode = getattr(self.processor, "batch_decode", None) or self.processor.tokenizer.batch_decode
        texts = [" ".join(t.split()) for t in decode(out, skip_special_tokens=True)]
        if self._echo:
            texts = [t[len(self._echo) :].strip() if t.startswith(self._echo) else t for t in texts]
        return texts

    # ---- a unit -------------------------------------------------------------------------------------

    def _items(self, source, unit, stop: threading.Event) -> Iterator[list[_Item]]:
        """The unit's samples that get a caption, decoded and preprocessed, in batches, in order (run in
        the prefetch thread; decoding and preprocessing on ``reader_threads`` threads: PIL and numpy
        release the GIL). A sample the source or the decode rejects is left to the writer, which skips
        it for that reason."""
        batch: list[_Item] = []
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.reader_threads, thread_name_prefix="caption-read") as pool:

            def take() -> Iterator[list[_Item]]:
                item = pending.popleft().result()
                if item is not None:
                    batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch.copy()
                    batch.clear()

            for raw in source.read(unit):
                if stop.is_set():
                    return
                if isinstance(raw, BadSample):
                    continue
                try:
                    existing = decode_caption(raw.caption, required=False)
                except BadSample:
                    existing = None
                if not self.wants(existing):
                    continue
                pending.append(pool.submit(self._prepare, raw.key, raw.image, existing or ""))
                while len(pending) > 2 * self.reader_threads:
                    yield from take()
            while pending:
                yield from take()
        if batch:
            yield batch

    def _prepare(self, key: str, data: bytes | None, existing: str) -> _Item | None:
        try:
            image, _ = load_image(data, "image")
        except BadSample:
            return None
        try:
            inputs = self.preprocess(image)
        except Exception as e:  # an image the processor cannot take costs that sample only
            inputs = CaptionSkip(CAPTION_FAILED, f"preprocessing: {type(e).__name__}: {e}")
        return _Item(key, existing, inputs)

    def _caption_batch(self, items: list[_Item]) -> list[str | CaptionSkip]:
        import torch

        ready = [it for it in items if not isinstance(it.inputs, CaptionSkip)]
        texts: dict[int, str | CaptionSkip] = {}
        if ready:
            try:
                keys = ready[0].inputs.keys()
                batch = {k: torch.cat([it.inputs[k] for it in ready]) for k in keys}
                texts.update(zip(map(id, ready), self.generate(batch)))
            except Exception as e:
                if len(ready) > 1:  # find the image that fails (or fit a smaller batch): one by one
                    log.warning("a caption batch of %d failed (%s: %s); captioning it one by one",
                                len(ready), type(e).__name__, e)  # fmt: skip
                    for it in ready:
                        texts[id(it)] = self._caption_one(it)
                else:
                    texts[id(ready[0])] = CaptionSkip(CAPTION_FAILED, f"{type(e).__name__}: {e}")
        out = []
        for it in items:
            result = it.inputs if isinstance(it.inputs, CaptionSkip) else texts[id(it)]
            if isinstance(result, str) and not result:
                result = CaptionSkip(CAPTION_EMPTY, "the model generated no text")
            if isinstance(result, CaptionSkip):
                self.failed += 1
                log.debug("caption of %s failed: %s: %s", it.key, result.reason, result.detail)  # the writer logs it
            else:
                self.captioned += 1
                result = self.compose(result, it.existing)
            out.append(result)
        return out

    def _caption_one(self, item: _Item) -> str | CaptionSkip:
        try:
            return self.generate(item.inputs)[0]
        except Exception as e:
            return CaptionSkip(CAPTION_FAILED, f"{type(e).__name__}: {e}")

    def caption_unit(self, source, unit, should_stop: Callable[[], bool] | None = None,
                     on_batch: Callable[[], None] | None = None) -> dict[str, str | CaptionSkip] | None:  # fmt: skip
        """key -> the caption to write, or why the sample is skipped, for the unit's samples that get a
        generated caption (the others keep theirs); None when ``should_stop`` said stop."""
        if self.model is None:
            self.load()
        start, captions = time.time(), {}
        try:
            with closing(prefetch(lambda stop: self._items(source, unit, stop))) as batches:
                for items in batches:
                    if should_stop is not None and should_stop():
                        return None
                    captions.update(zip((it.key for it in items), self._caption_batch(items)))
                    self.seconds += time.time() - start
                    start = time.time()
                    if on_batch is not None:
                        on_batch()
        finally:
            self.seconds += time.time() - start
        if captions and all(isinstance(c, CaptionSkip) for c in captions.values()):
            first = next(iter(captions.values()))
            log.error("every caption of this unit (%d) failed, first: %s: %s; check the caption settings",
                      len(captions), first.reason, first.detail)  # fmt: skip
        return captions

    def jobs(self, jobs: Iterable[tuple[int, Any]], source, should_stop=None, on_batch=None) -> Iterator[tuple]:
        """``(index, unit)`` -> ``(index, unit, captions)``, each unit captioned as it is asked for; stops
        (no further jobs) once ``should_stop`` says so."""
        for index, unit in jobs:
            captions = self.caption_unit(source, unit, should_stop, on_batch)
            if captions is None:
                return
            yield index, unit, captions

    def close(self) -> None:
        """Let the model go (a UI process outlives the job) and put torch's thread count back."""
        if self.model is None:
            return
        import torch

        on_cuda = self.device.startswith("cuda")
        self.model = self.processor = None
        if on_cuda:
            torch.cuda.empty_cache()
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    @property
    def rate(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0
