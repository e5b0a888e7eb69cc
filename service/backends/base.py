"""What every backend is: glipv2.runtime's batch assembly (BatchRunner: prompt-feature
cache, bucket padding, one engine call per batch, postprocessing, answer ranking, caption
decoding) over an engine, configured from the repository's manifest.

The embedded backend's engine is ONNX Runtime in this process (glipv2.runtime.onnx), the
Triton backend's a tritonclient adapter (service.backends.triton); evaluation and the
export parity checks run the same BatchRunner with the PyTorch and TensorRT engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from glipv2.postprocess import Detections
from glipv2.runtime.batch import BatchItem, BatchRunner, CaptionBatchItem, Engine, TaskUnavailable, VqaBatchItem
from glipv2.runtime.manifest import Manifest
from glipv2.text import Prompt, TokenizedPrompt, Tokenizer, build_prompt, encode_question, tokenize
from glipv2.understanding import Answer, Caption

__all__ = ["Backend", "BatchItem", "CaptionBatchItem", "EngineBackend", "VqaBatchItem"]


class Backend(Protocol):
    name: str
    manifest: Manifest
    image_hw: tuple[int, int]
    device: str  # where the models run: "cpu" or "cuda"
    providers: list[str] | None  # ONNX Runtime's providers of the embedded backend's sessions
    tasks: list[str]
    caption_max_len: int

    def tokenize(self, prompt: str | list[str] | Prompt) -> TokenizedPrompt: ...

    def encode_question(self, question: str): ...

    def run_batch(self, items: list[BatchItem]) -> list[Detections]:
        """Blocking: one engine call for the whole batch (called in a worker thread)."""
        ...

    def run_vqa_batch(self, items: list[VqaBatchItem]) -> list[Answer]: ...

    def run_caption_batch(self, items: list[CaptionBatchItem]) -> list[Caption]: ...

    def ping(self) -> None:
        """Blocking: raise if the backend cannot answer."""
        ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class EngineBackend(BatchRunner):
    """A BatchRunner over `engine`, set up from <repository>/manifest.json."""

    name = "engine"
    device = "cpu"
    providers: list[str] | None = None

    def __init__(self, repository: Path, engine: Engine, cache_size: int = 1024,
                 manifest: Manifest | None = None, cache_bytes: int = 64 * 1024 * 1024) -> None:
        self.repository = Path(repository)
        self.manifest = manifest or Manifest.load(self.repository)
        m = self.manifest
        self.max_tokens = m.max_tokens
        caption = m.caption
        super().__init__(engine, Tokenizer(self.repository / m.tokenizer, max_tokens=m.max_tokens), m.image_hw,
                         m.token_buckets, answers=m.answer_vocabulary,
                         caption_tokens=caption.tokens if caption else None,
                         caption_max_len=caption.max_len if caption else 0,
                         caption_end_id=caption.end_id if caption else 0,
                         caption_words=caption.words if caption else (),
                         caption_checked_phrases=caption.checked_phrases if caption else (), cache_size=cache_size,
                         cache_bytes=cache_bytes)

    @property
    def tasks(self) -> list[str]:
        """What this model serves: detect (always), vqa, caption."""
        return ["detect"] + ["vqa"] * bool(self.answers) + ["caption"] * (self.captioner is not None)

    def models(self) -> list[str]:
        """The graphs the backend calls (those of the manifest)."""
        return list(self.manifest.models)

    def tokenize(self, prompt: str | list[str] | Prompt) -> TokenizedPrompt:
        """A detection prompt ("red circle. star." or a list of phrases) or a built Prompt
        (a caption with phrase spans). PromptError (-> 422) for empty prompts, phrases
        without tokens, more than max_tokens tokens."""
        return tokenize(self.tokenizer, prompt if isinstance(prompt, Prompt) else build_prompt(prompt),
                        self.manifest.postprocess.phrase_tokens)

    def encode_question(self, question: str):
        """Question -> token ids; PromptError (-> 422) when empty or over max_tokens."""
        if not self.answers:
            raise TaskUnavailable("this model has no VQA head (its checkpoint was trained without VQA)")
        return encode_question(self.tokenizer, question)

    def ping(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
