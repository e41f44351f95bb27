"""Generation with thoughts, KV-cached (DESIGN.md sections 3-4 at inference time), and `quietstar-generate`.

For each new token, with the prefix x_0..x_t already in the decoder's KV cache:
  1. the base prediction W h_base, h_base = the final-norm hidden state at t (from the step that fed x_t);
  2. a thought: <sot> s_1 .. s_M <eot> decoded one token at a time against the prefix's cache, at RoPE
     positions t+1 .. t+M+2 as in training; s_m ~ softmax(W h / tau_sample) without the banned ids (or
     forced); the hidden state at <eot> is h_talk, the talk prediction k = 1;
  3. the mixed prediction log_softmax((1 - w) W h_base + w W h_talk), w = mixing_head(h_base, h_talk);
  4. the thought's K/V are dropped (the cache is cropped back to the prefix), the next token is chosen
     from the mixed prediction (greedy, or sampled at `temperature`) and fed as the next base step.
That is M + 3 decode steps per token, none recomputing an earlier thought. With `n_thoughts` > 1, steps 2-3
run for all thoughts at once (`ThinkingDecoder.think_many`: each row's cache copied once per thought, every
copy against the same prefix) and the next-token distribution is the mean of their mixed probabilities: the
marginal over sampled thoughts.

Batched rows may have different prompt lengths: pad them on the left and pass `attention_mask`; the
positions of each row follow its own length. Plain calls of the decoder are stock SDPA
(quietstar/attention.py), so the cache, the masks and the positions here are transformers' own.
"""
from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .model import QuietStarModel, load_export_tokenizer
from .thoughts import check_token_ids, vocab_rows


@dataclass
class Thought:
    """What one thinking step produced for the batch (`think`; `think_many` puts its n thoughts after B)."""
    tokens: torch.Tensor       # (B, M) the thought tokens s_1..s_M
    w: torch.Tensor            # (B,) the mixing weight
    logp_mix: torch.Tensor     # (B, V) float32, the mixed next-token log-probabilities


def mixed_logprobs(model: QuietStarModel, h_base: torch.Tensor, h_talk: torch.Tensor):
    """(log_softmax((1 - w) W h_base + w W h_talk) (B, V) float32, w (B,)), w = mixing_head(h_base, h_talk)."""
    W = model.lm_head_weight
    w = model.mixing_head(h_base, h_talk)
    logits = (1 - w)[:, None] * (h_base @ W.T).float() + w[:, None] * (h_talk @ W.T).float()
    return torch.log_softmax(logits, dim=-1), w


def thought_logits(model: QuietStarModel, h: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """W h / tau_sample in fp32 with the banned ids (a device tensor) at -inf: what a thought token is drawn from."""
    z = (h @ model.lm_head_weight.T).float() / model.thought.tau_sample
    return z.index_fill_(1, banned, float("-inf")) if banned.numel() else z


def check_prompt(model: QuietStarModel, input_ids, attention_mask) -> torch.Tensor:
    """Validate a left-padded prompt batch; return its mask as bool (B, S): True where `attention_mask` is non-zero
    (any non-zero value attends, as in Hugging Face models), all True without one."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a (B, S) int64 tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be (B, S) with B >= 1 and S >= 1, got shape {tuple(input_ids.shape)}")
    check_token_ids("input_ids", input_ids, input_ids.shape, "(B, S)", model.lm_head_weight.device,
                    vocab_rows(model))
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor (or None), got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
    mask = attention_mask != 0
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: pad the prompts on the left (the last column must be real tokens)")
    return mask


class ThinkingDecoder:
    """A batch of sequences with the decoder's KV cache; `think()` and `advance()` make one token.

    >>> dec = ThinkingDecoder(model, prompt_ids, attention_mask)
    >>> th = dec.think()                       # a thought and the mixed prediction of the next token
    >>> dec.advance(th.logp_mix.argmax(-1))     # the chosen token becomes the next base step
    """

    def __init__(self, model: QuietStarModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        from transformers import DynamicCache
        self.model = model
        self.mask = check_prompt(model, input_ids, attention_mask).long()
        self.banned = torch.tensor(model.banned_ids, dtype=torch.long, device=input_ids.device)
        self.pos = self.mask.sum(1) - 1                   # (B,) RoPE position of each row's last token
        self.last_pos = int(self.pos.max())               # the same, largest over rows, on the host (checks)
        if self.last_pos >= model.max_positions:
            raise ValueError(f"input_ids: a prompt of {self.last_pos + 1} tokens does not fit the model's "
                             f"max_position_embeddings={model.max_positions}")
        self.cache = DynamicCache(config=model.lm.config)
        position_ids = (self.mask.cumsum(1) - 1).clamp_min(0)
        self.h_base = self._run(model.embed(input_ids), position_ids)
        self.length = input_ids.shape[1]                  # tokens in the cache (prefix, padding included)

    def _run(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Feed (B, n, d) embeddings at `position_ids` through the cache; the last final-norm hidden state."""
        out = self.model.lm.model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=self.mask,
                                  past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    def _step(self, embed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self._run(embed[:, None], position[:, None])

    def base_logprobs(self) -> torch.Tensor:
        """log_softmax(W h_base): the prediction without a thought, (B, V) float32."""
        return torch.log_softmax((self.h_base @ self.model.lm_head_weight.T).float(), dim=-1)

    @torch.no_grad()
    def think(self, generator: torch.Generator | None = None, thought: torch.Tensor | None = None,
              greedy_thought: bool = False) -> Thought:
        """One thought for every row (sampled; or its argmax tokens with `greedy_thought`; or `thought` (B, M)
        forced) and the mixed next-token log-probs."""
        B, M = self.h_base.shape[0], self.model.thought.M
        if thought is not None:
            check_token_ids("thought", thought, (B, M), f"(B={B}, M={M})", self.h_base.device,
                            vocab_rows(self.model), sync=False)
        th = self._think(1, generator, None if thought is None else thought[:, None], greedy_thought)
        return Thought(tokens=th.tokens[:, 0], w=th.w[:, 0], logp_mix=th.logp_mix[:, 0])

    @torch.no_grad()
    def think_many(self, n: int, generator: torch.Generator | None = None, thoughts: torch.Tensor | None = None,
                   greedy_thought: bool = False) -> Thought:
        """n thoughts for every row at once, each against the same prefix: a Thought with tokens (B, n, M), w (B, n)
        and logp_mix (B, n, V). The same as n calls of `think` (equal for forced `thoughts` (B, n, M); sampled ones
        draw from the same distribution, not the same random numbers), but the n thoughts of a row decode as n rows
        of one batch: M + 2 decode steps, not n (M + 2), for a KV cache copied n times while they run."""
        B, M = self.h_base.shape[0], self.model.thought.M
        if not isinstance(n, numbers.Integral) or isinstance(n, bool):
            raise TypeError(f"n must be an int (thoughts per row), got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if thoughts is not None:
            check_token_ids("thoughts", thoughts, (B, n, M), f"(B={B}, n={n}, M={M})", self.h_base.device,
                            vocab_rows(self.model), sync=False)
        return self._think(n, generator, thoughts, greedy_thought)

    def _think(self, n, generator, thoughts, greedy_thought) -> Thought:
        model, th = self.model, self.model.thought
        B = self.h_base.shape[0]
        # transformers' windowed cache keeps W - 1 tokens and can drop the thought again only below that
        model.check_window(self.length + th.M + 3, f"a thought after {self.length} cached tokens (the prompt with "
                           f"its padding and the tokens generated) with its M + 2 = {th.M + 2} tokens")
        if self.last_pos + th.M + 2 >= model.max_positions:     # its <eot>, as quietstar_forward's check_lengths
            raise ValueError(f"a thought after position {self.last_pos} would reach position "
                             f"{self.last_pos + th.M + 2} (M + 2 = {th.M + 2} tokens), but the model has "
                             f"max_position_embeddings={model.max_positions}")
        sot, eot = model.marker_embeddings()
        n0, mask0 = self.length, self.mask
        h_base, pos = self.h_base, self.pos
        try:
            if n > 1:      # row b's thoughts are rows b n .. b n + n - 1, each with a copy of b's cache
                self.cache.batch_repeat_interleave(n)
                self.mask = self.mask.repeat_interleave(n, dim=0)
                h_base, pos = h_base.repeat_interleave(n, dim=0), pos.repeat_interleave(n, dim=0)
            forced = None if thoughts is None else thoughts.reshape(B * n, th.M)
            tokens = torch.empty(B * n, th.M, dtype=torch.long, device=h_base.device)
            h = self._step(sot.expand(B * n, -1), pos + 1)
            for m in range(th.M):
                if forced is not None:
                    s = forced[:, m]
                else:
                    z = thought_logits(model, h, self.banned)
                    if not greedy_thought:   # Gumbel-max: a sample of softmax(z)
                        u = torch.rand(z.shape, generator=generator, device=z.device).clamp_min_(
                            torch.finfo(z.dtype).tiny)
                        z = z - torch.log(-torch.log(u))
                    s = torch.argmax(z, dim=-1)
                tokens[:, m] = s
                h = self._step(model.embed(s), pos + 2 + m)
            h_talk = self._step(eot.expand(B * n, -1), pos + th.M + 2)
            logp_mix, w = mixed_logprobs(model, h_base, h_talk)
        finally:
            self._restore(n0, B, n)
            self.mask = mask0
        return Thought(tokens=tokens.view(B, n, th.M), w=w.float().view(B, n), logp_mix=logp_mix.view(B, n, -1))

    def _restore(self, n0: int, B: int, n: int) -> None:
        """The cache back to the prefix's n0 tokens and B rows: each layer's thought K/V dropped (a negative crop
        removes that many tokens) and the copies of `think_many`. Layer by layer, so that an error in the middle of
        a forward (layers before it one token longer) or of the copying leaves a correct cache too."""
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - n0
            if extra > 0:
                layer.crop(-extra)
            if n > 1 and getattr(layer, "keys", None) is not None and layer.keys.shape[0] == B * n:
                layer.batch_select_indices(torch.arange(0, B * n, n, device=layer.keys.device))

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor) -> None:
        """Append the chosen next token (B,) of every row as a base step. Bad `tokens` are refused before anything
        changes (ids outside [0, V) only when on the CPU: on a GPU that check would sync once per token), and a
        step that fails leaves the decoder as it was: the cache, the mask and the positions."""
        B = self.h_base.shape[0]
        check_token_ids("tokens", tokens, (B,), f"(B={B},)", self.h_base.device, vocab_rows(self.model),
                        sync=False)
        if self.last_pos + 1 >= self.model.max_positions:
            raise ValueError(f"advance: position {self.last_pos + 1} is past the model's "
                             f"max_position_embeddings={self.model.max_positions}")
        n0, mask0 = self.length, self.mask
        try:
            h = self._step(self.model.embed(tokens), self.pos + 1)
        except BaseException:
            self._restore(n0, B, 1)
            self.mask = mask0
            raise
        self.h_base, self.pos, self.length, self.last_pos = h, self.pos + 1, n0 + 1, self.last_pos + 1


@torch.no_grad()
def generate_with_thoughts(model: QuietStarModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           max_new_tokens: int = 32, temperature: float = 0.0, n_thoughts: int = 1,
                           generator: torch.Generator | None = None, stop_ids=(), progress: bool = False):
    """Generate up to `max_new_tokens` per row, thinking before each. temperature 0: greedy.

    Returns (tokens (B, n) int64, thoughts (B, n, n_thoughts, M) int64, w (B, n, n_thoughts)); a row that
    produced a stop id keeps producing it (so it can be cut there) and the loop ends when all rows have. Every
    argument is checked before any work, the length included: the last thought must fit the model's
    max_position_embeddings (as quietstar_forward's chains must) and a sliding window."""
    mask = check_prompt(model, input_ids, attention_mask)
    for name, v, low in (("max_new_tokens", max_new_tokens, 1), ("n_thoughts", n_thoughts, 1)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number (0: greedy), got {type(temperature).__name__} {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != input_ids.device.type:
        raise ValueError(f"generator is on {generator.device} but input_ids is on {input_ids.device}")
    V = model.lm_head_weight.shape[0]
    if getattr(stop_ids, "ndim", 0) == 1 and hasattr(stop_ids, "tolist"):    # a 1-D tensor or array of ids
        stop_ids = stop_ids.tolist()
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Iterable):
        raise TypeError(f"stop_ids must be a sequence of token ids (e.g. [tok.eos_token_id]), got "
                        f"{type(stop_ids).__name__} {stop_ids!r}")
    stop_ids = list(stop_ids)
    bad = [i for i in stop_ids if not isinstance(i, numbers.Integral) or isinstance(i, bool) or not 0 <= i < V]
    if bad:
        raise ValueError(f"stop_ids must hold int token ids in [0, V={V}), got {bad[:4]}")
    M, S = model.thought.M, input_ids.shape[1]
    # the last thought's <eot> sits at RoPE position (n - 1) + (max_new_tokens - 1) + M + 2 for a row of n prompt
    # tokens: as quietstar_forward's check_lengths, it must be below max_position_embeddings
    n = int(mask.sum(1).max())
    if n + max_new_tokens + M >= model.max_positions:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit: after a prompt of {n} tokens, the last "
                         f"thought (M + 2 = {M + 2} tokens) would reach position {n + max_new_tokens + M}, but the "
                         f"model has max_position_embeddings={model.max_positions} (at most "
                         f"{max(model.max_positions - 1 - n - M, 0)} new tokens for this prompt)")
    # the last thought follows S + max_new_tokens - 1 cached tokens (ThinkingDecoder.think's condition): refused
    # now rather than mid-generation
    model.check_window(S + max_new_tokens + M + 2,
                       f"max_new_tokens={max_new_tokens} after a prompt of {S} tokens (with its "
                       f"padding), with a thought of M + 2 = {M + 2} tokens before each")
    dec = ThinkingDecoder(model, input_ids, attention_mask)
    B = input_ids.shape[0]
    stop = torch.tensor(sorted(set(int(i) for i in stop_ids)), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out, thoughts, ws = [], [], []
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="generating (thinking)", unit="tok")
    for _ in steps:
        th = dec.think_many(n_thoughts, generator)
        logp = torch.logsumexp(th.logp_mix, dim=1) - math.log(n_thoughts)
        if temperature == 0:
            nxt = logp.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=generator)[:, 0]
        if out and stop.numel():
            nxt = torch.where(done, out[-1], nxt)
        out.append(nxt)
        thoughts.append(th.tokens)
        ws.append(th.w)
        if stop.numel():
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
        dec.advance(nxt)
    return torch.stack(out, 1), torch.stack(thoughts, 1), torch.stack(ws, 1)


def end_token_ids(tok) -> list[int]:
    """Ids that end a generation: the tokenizer's eos and, where the vocabulary has them, the usual
    end-of-text / end-of-turn tokens (SmolLM2's instruct model ends a turn with <|im_end|>, not its eos)."""
    ids = {tok.eos_token_id} if getattr(tok, "eos_token_id", None) is not None else set()
    unk = getattr(tok, "unk_token_id", None)
    for t in ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"):
        i = tok.convert_tokens_to_ids(t) if hasattr(tok, "convert_tokens_to_ids") else None
        if isinstance(i, int) and i >= 0 and i != unk:
            ids.add(i)
    return sorted(ids)


# ----------------------------------------------------------------------------------------------
# quietstar-generate
# ----------------------------------------------------------------------------------------------
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype` as a torch dtype: "auto" is bfloat16 on CUDA, float32 on any other device."""
    if name not in DTYPES:
        raise ValueError(f"--dtype: unknown {name!r}; choose from {', '.join(DTYPES)}")
    if DTYPES[name] is not None:
        return DTYPES[name]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_parser() -> argparse.ArgumentParser:
    from .train import CliParser
    p = CliParser(prog="quietstar-generate", description="Generate text with thoughts (KV-cached).",
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a folder written by QuietStarModel.save_pretrained (quietstar-train's "
                                 "OUT_DIR/export), or smollm2-135m (the stock model: zero mixing head, so its "
                                 "thoughts change nothing)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (at most)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--thoughts", type=int, default=1, help="thoughts per token, their predictions averaged")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--show-thoughts", action="store_true", help="print each token's thought inline, marked")
    p.add_argument("--no-thoughts", action="store_true", help="plain decoding (the base model), for comparison")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    p.add_argument("--seed", type=int, default=0, help="of the sampled thoughts (and tokens, with --temperature)")
    p.add_argument("--device", default="auto", help="auto (CUDA where there is a GPU), cuda or cpu")
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="the weights' dtype. auto: bfloat16 on CUDA (half float32's memory, and half the weight "
                        "traffic that a decode step is bound by), float32 elsewhere")
    return p


def main(argv=None) -> int:
    """The CLI; bad input (a missing or mismatched export, ...) ends in one line, exit status 2 (`--debug`:
    the traceback)."""
    from .train import run_cli
    return run_cli("quietstar-generate", _main, argv)


def _main(argv) -> int:
    from pathlib import Path

    args = build_parser().parse_args(argv)
    from .train import resolve_device
    device = resolve_device(args.device)
    for flag, v in (("--max-new-tokens", args.max_new_tokens), ("--thoughts", args.thoughts)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.no_thoughts and (args.show_thoughts or args.thoughts != 1):
        raise ValueError("--no-thoughts decodes without thoughts: drop --show-thoughts / --thoughts")
    if "" in args.stop:
        raise ValueError("--stop: an empty stop string matches before any token (give a non-empty one)")
    prompts = list(args.prompt)
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise ValueError(f"--prompts-file {args.prompts_file}: no such file")
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                from_file = [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        if not from_file:
            raise ValueError(f"--prompts-file {args.prompts_file}: no prompts (every line is empty or blank; "
                             "one prompt per line)")
        prompts += from_file
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts-file FILE (one prompt per line)")
    if args.model == "smollm2-135m":
        from . import assets
        from .evaluate import stock_model
        tok = assets.smollm2_tokenizer()
        model = stock_model(tok, weights_dtype(args.dtype, device)).to(device).eval()
    else:
        model = QuietStarModel.from_pretrained(args.model, dtype=weights_dtype(args.dtype, device),
                                               device=device).eval()
        tok = load_export_tokenizer(args.model)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stop_ids = end_token_ids(tok)
    if args.no_thoughts:
        kw = dict(do_sample=args.temperature > 0, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        if args.temperature > 0:
            kw["temperature"] = args.temperature
        # transformers samples from torch's global RNG: seeded by --seed here, the caller's state restored after
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            new = model.lm.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        thoughts = None
    else:
        new, thoughts, _ = generate_with_thoughts(model, ids, mask, args.max_new_tokens, args.temperature,
                                                  args.thoughts, gen, stop_ids, progress=True)
    for i, prompt in enumerate(prompts):
        n = new.shape[1]
        for j in range(n):          # cut at the first stop id, or where a stop string appears in the text
            if (stop_ids and int(new[i, j]) in stop_ids) or any(s in tok.decode(new[i, : j + 1]) for s in args.stop):
                n = j
                break
        text = tok.decode(new[i, :n])
        if args.show_thoughts and thoughts is not None:
            text = "".join("".join(f"<|thought|>{tok.decode(thoughts[i, j, p])}<|/thought|>"
                                   for p in range(thoughts.shape[2])) + tok.decode(new[i, j:j + 1]) for j in range(n))
        print(f"=== {prompt!r}\n{prompt}{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
