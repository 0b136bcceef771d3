"""A chat conversation over `stream`: the template, the history, and the context budget.

`ChatSession` keeps the messages, renders them with the tokenizer's chat template and,
when the conversation no longer fits the context window (prompt + room for the answer),
drops the oldest turns first (the system prompt stays). `lmstack chat` is a thin REPL on it.
"""

from __future__ import annotations

from collections.abc import Iterator

from lmstack.errors import ConfigError
from lmstack.infer.decoder import Decoder, make_decoder
from lmstack.infer.params import GenerationConfig

# End-of-turn markers of common templates: generation stops on them as on EOS. <|eom_id|> is Llama
# 3.1's end of a tool-calling (ipython) message: the turn ends there too, waiting for the tool's output.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_ids_for_chat(tokenizer, model=None) -> list[int]:
    """The model's stop ids, the tokenizer's EOS, and the template's end-of-turn tokens.

    The model's stop ids are config.json's eos ids and those of its generation_config.json, which
    loading keeps on `model.config.generation_defaults` (checked there: a broken file is a
    CheckpointError naming it when the model is loaded)."""
    config = getattr(model, "config", None)
    ids: list[int] = config.stop_token_ids() if config is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.backend.token_to_id(token)
        if token_id is not None:
            ids.append(token_id)
    return sorted(set(ids))


class ChatSession:
    def __init__(self, model, tokenizer, config: GenerationConfig | None = None, system: str | None = None,
                 stop_token_ids: list[int] | None = None, decoder: Decoder | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or GenerationConfig(temperature=0.7, top_p=0.9, max_new_tokens=512)
        self.config.validate(model.config.vocab_size)
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.stop_ids = stop_token_ids if stop_token_ids is not None else stop_ids_for_chat(tokenizer, model)
        self.decoder = decoder or make_decoder(model)
        self.context = model.config.max_position_embeddings
        room = self.config.max_tokens
        self.answer_room = min(room if room is not None else self.context // 2, self.context // 2)
        self.dropped_turns = 0
        self.last_prompt_tokens = 0

    def reset(self) -> None:
        self.messages.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return self.tokenizer.apply_chat_template(full, add_generation_prompt=True, tokenize=True)

    def prompt_ids(self, user_text: str) -> list[int]:
        """The rendered prompt with this new message; drops the oldest turns until it fits."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        while True:
            ids = self._render(messages)
            if len(ids) + self.answer_room <= self.context:
                return ids
            if len(messages) <= 1:
                raise ConfigError(f"this message needs {len(ids)} tokens with the system prompt, but the context "
                                  f"is {self.context} tokens and {self.answer_room} are kept for the answer; "
                                  "send a shorter message (or /system a shorter system prompt)")
            cut = 2 if len(messages) > 2 and messages[1]["role"] == "assistant" else 1
            messages = messages[cut:]
            self.messages = self.messages[cut:]
            self.dropped_turns += 1

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the answer to one user message; the exchange is added to the history."""
        from lmstack.infer.generate import stream

        ids = self.prompt_ids(user_text)
        self.last_prompt_tokens = len(ids)
        room = min(self.answer_room, self.context - len(ids))
        config = self.config.replace(max_tokens=room, max_new_tokens=room, eos_token_ids=self.stop_ids)
        answer = []
        for delta in stream(self.model, ids, config, self.tokenizer, decoder=self.decoder):
            answer.append(delta)
            yield delta
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": "".join(answer)}]
