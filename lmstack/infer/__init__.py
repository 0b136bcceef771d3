"""Single-request inference: sampling, generate (greedy / sampling / beams), streaming,
static-cache + CUDA-graph decoding, quantization and speculative decoding."""

from lmstack.infer.decoder import CompiledDecoder, Decoder, make_decoder
from lmstack.infer.generate import generate, prompt_logprobs, stream
from lmstack.infer.outputs import CompletionOutput, RequestOutput
from lmstack.infer.params import GenerationConfig, SamplingParams
from lmstack.infer.sampling import SamplingTensors, TokenCounts, process_logits, sample

__all__ = ["CompiledDecoder", "CompletionOutput", "Decoder", "GenerationConfig", "RequestOutput", "SamplingParams",
           "SamplingTensors", "TokenCounts", "generate", "make_decoder", "process_logits", "prompt_logprobs", "sample",
           "stream"]
