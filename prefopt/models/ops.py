"""Tensor plumbing shared by every backend: batching (prompt, response) token ids, log-probs, sampling.

Layout of a batch (P = widest prompt, R = widest response)::

    input_ids  = [pad .. pad | prompt ] [ response | pad .. pad ]     (B, P + R)
                  left-padded prompts      right-padded responses

Masks come from *lengths*, never from token ids: SmolLM2's pad token is its EOS token, so an EOS the model
emitted and a pad look the same. ``position_ids`` count only real tokens, so left padding does not shift
positions (generation does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prefopt._alloc import release_heap
from prefopt.data.records import Prompt
from prefopt.models.kernels import linear


@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    position_ids: torch.Tensor  # (B, P+R)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) float, 1.0 on real response tokens
    response_lengths: torch.Tensor  # (B,) long
    prompt_width: int  # P

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_batch(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, device
) -> SeqBatch:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    R = max(max(len(r) for r in response_ids), 1)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if len(r):
            ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, P : P + len(r)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    resp_mask = (torch.arange(R)[None, :] < lengths[:, None]).float()
    return SeqBatch(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        position_ids=pos.to(device),
        response_ids=ids[:, P:].to(device),
        response_mask=resp_mask.to(device),
        response_lengths=lengths.to(device),
        prompt_width=P,
    )


def hidden_states(lm, batch: SeqBatch) -> torch.Tensor:
    """Last hidden states of the decoder (after the final norm): (B, P+R, H)."""
    out = lm.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def response_hidden(hidden: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
    """The states that *predict* each response token: positions P-1 .. P+R-2. (B, R, H)"""
    P = batch.prompt_width
    R = batch.response_ids.shape[1]
    return hidden[:, P - 1 : P + R - 1]


def response_logits(lm, hidden: torch.Tensor, batch: SeqBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits for the response tokens only, divided by the sampling temperature: (B, R, V) in fp32.

    Only R positions go through the LM head (the biggest matmul in a 135M model with a 49k vocab). At temperature
    1 no division runs (x / 1 is x, bit for bit): a (B, R, V) pass forward and another backward saved.
    """
    logits = _head(lm.get_output_embeddings(), response_hidden(hidden, batch)).float()
    return logits if temperature == 1 else logits / temperature


def _head(head: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The LM head on (B, R, H) states as one 2-D matmul: (B, R, V). A strided 3-D input goes through a batched
    matmul that measured twice as slow here (SmolLM2-135M, 512 x 576 x 49152)."""
    B, R, H = states.shape
    return head(states.reshape(B * R, H)).view(B, R, -1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] = logit - logsumexp(logits): (B, R, V), (B, R) -> (B, R), without materialising
    a second (B, R, V) tensor (the log-softmax) in the forward pass."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(states @ W.T / T)[tokens] with a backward pass that works in place on the one saved (N, V)
    logits tensor. Autograd's graph of the same formula (:func:`gather_logprobs` on :func:`response_logits`) takes
    five fresh (N, V) tensors in its backward (logsumexp's ``x - lse``, its ``exp``, the product with the grad,
    the gather's zeros and the sum of the two grads); at a PPO micro-batch of 4 x 32 positions each is 25 MB that
    the kernel faults in and zeroes. Bit-identical to that graph, forward and backward: the same kernels on the
    same values in the same order (tests/test_models.py)."""

    @staticmethod
    def forward(ctx, states, weight, tokens, temperature):  # (N, H), (V, H), (N,) -> (N,)
        logits = linear(states, weight)  # the head's 2-D matmul, as :func:`_head` runs it (ATen's or oneDNN's)
        if temperature != 1:
            logits.div_(temperature)
        lse = torch.logsumexp(logits, dim=-1)
        out = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
        ctx.save_for_backward(states, weight, tokens, logits, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # d out / d logits = onehot(tokens) - softmax(logits)
        if getattr(ctx, "spent", False):  # the saved logits were overwritten by the first call
            raise RuntimeError("response_token_logprobs: a second backward pass through the same graph "
                               "(retain_graph=True) is not supported; recompute the forward pass")
        ctx.spent = True
        states, weight, tokens, logits, lse = ctx.saved_tensors
        g = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(grad.neg().unsqueeze(-1))  # logsumexp's backward, in place
        g.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))  # the gather's
        if ctx.temperature != 1:
            g.div_(ctx.temperature)
        grad_states = linear(g, weight.t()) if ctx.needs_input_grad[0] else None  # = g @ W, the head's backward
        grad_weight = g.t().mm(states) if ctx.needs_input_grad[1] else None
        return grad_states, grad_weight, None, None


def response_token_logprobs(lm, hidden: torch.Tensor, batch: SeqBatch, temperature: float = 1.0) -> torch.Tensor:
    """log-probs of the response tokens (B, R) from the trunk states (B, P+R, H), differentiable: equals
    ``gather_logprobs(response_logits(...), batch.response_ids)`` bit for bit, with a backward pass that allocates
    no (B, R, V) tensor of its own (:class:`_TokenLogprobs`). A head other than a bias-free ``nn.Linear`` (a LoRA
    on the head, say) takes that plain path."""
    head = lm.get_output_embeddings()
    states = response_hidden(hidden, batch)
    if type(head) is not torch.nn.Linear or head.bias is not None or states.dtype != torch.float32 \
            or head.weight.dtype != torch.float32:
        return gather_logprobs(response_logits(lm, hidden, batch, temperature), batch.response_ids)
    B, R, H = states.shape
    out = _TokenLogprobs.apply(states.reshape(B * R, H), head.weight, batch.response_ids.reshape(B * R), temperature)
    return out.view(B, R)


LOGIT_POSITIONS = 256
"""Response positions whose vocabulary logits a no-grad pass holds at once (256 x 49k fp32 = 50 MB): evaluation,
reference and rollout log-probs cost memory bounded by this, not by their batch. 512 set the default bench's
PPO peak (the rollout's entropy pass: logits, their log-softmax and its product, 100 MB each); 256 positions ran
as fast (the entropy pass over 256 positions, freed blocks kept in the heap: 128-129 ms at 256, 134-135 ms at
512, 143-152 ms at 128)."""


@torch.no_grad()
def logprob_stats(lm, hidden: torch.Tensor, batch: SeqBatch, temperature: float = 1.0, *, entropy: bool = False,
                  full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """No-grad per-token statistics of the response under ``lm`` from its trunk states: log-probs (B, R), with
    ``entropy`` the entropy (B, R), with ``full`` the whole log-softmax (B, R, V). The LM head runs on at most
    :data:`LOGIT_POSITIONS` positions at a time; rows are independent, so this equals the one-shot computation."""
    return head_stats(lm, response_hidden(hidden, batch), batch.response_ids, temperature, entropy=entropy, full=full)


@torch.no_grad()
def head_stats(lm, states: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *, entropy: bool = False,
               full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`logprob_stats` from the states that predict each token, (B, R, H), and the tokens (B, R): the LM head
    of ``lm`` on them, :data:`LOGIT_POSITIONS` positions at a time."""
    head = lm.get_output_embeddings()
    rows = max(1, LOGIT_POSITIONS // max(tokens.shape[1], 1))
    logps, ents, fulls = [], [], []
    for i in range(0, tokens.shape[0], rows):  # in place where the same values allow: two (rows, R, V) tensors at most
        logits = _head(head, states[i : i + rows]).float()  # the head's output is this chunk's own
        if temperature != 1:
            logits.div_(temperature)
        logps.append(gather_logprobs(logits, tokens[i : i + rows]))
        logp = torch.log_softmax(logits, dim=-1) if entropy or full else None
        del logits
        if entropy:
            plogp = logp.exp().mul_(logp)
            ents.append(plogp.sum(-1).neg_())
            del plogp
        if full:
            fulls.append(logp)
        del logp
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(logps), cat(ents), cat(fulls)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the categorical given by logits: (B, R, V) -> (B, R)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_logprobs(lm, batch: SeqBatch, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of the response tokens under ``lm`` (active adapter): (B, R), zero on padding. Without
    grad, the LM head runs in chunks (:func:`logprob_stats`); with it, through :func:`response_token_logprobs`."""
    hidden = hidden_states(lm, batch)
    if not torch.is_grad_enabled():
        return logprob_stats(lm, hidden, batch, temperature)[0] * batch.response_mask
    return response_token_logprobs(lm, hidden, batch, temperature) * batch.response_mask


def last_token_hidden(hidden: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
    """Hidden state at each sequence's last real token (prompt end if the response is empty): (B, H)."""
    idx = batch.prompt_width + batch.response_lengths - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def mean_response_hidden(hidden: torch.Tensor, batch: SeqBatch, exclude: int | None = None) -> torch.Tensor:
    """Mean of the hidden states *at* each sequence's response tokens (positions P .. P+len-1): (B, H). With
    ``exclude`` (a token id, e.g. EOS), positions holding that token are left out of the mean. A response with
    no token to average (empty, or only ``exclude``) gets the prompt's last state (position P-1)."""
    P, R = batch.prompt_width, batch.response_ids.shape[1]
    keep = batch.response_mask if exclude is None else batch.response_mask * (batch.response_ids != exclude)
    mask = keep.to(hidden.dtype).unsqueeze(-1)  # (B, R, 1)
    summed = (hidden[:, P : P + R] * mask).sum(1)
    count = mask.sum(1)  # (B, 1)
    return torch.where(count > 0, summed / count.clamp(min=1), hidden[:, P - 1])


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """The text the model sees, the same for every stage (SFT, RM, DPO, PPO, eval): conversations through the
    tokenizer's chat template, or the plain 'Question: ...\n\nAnswer:' template for a model without one; an
    Anthropic-HH transcript as its turns through the chat template (as is for a model without one); any other
    plain prompt as is."""
    from prefopt.data.io import hh_turns, plain_template

    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        turns = hh_turns(prompt) if has_template else None
        if turns is None:
            return prompt
        prompt = turns
    if not has_template:
        return plain_template(prompt)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


CHARS_PER_TOKEN = 16  # the first window of characters tried per token wanted; doubled until it is enough


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def head_tokens(tokenizer, text: str, n: int) -> list[int]:
    """The first ``n`` token ids of ``text`` without tokenising all of it (a 30 MB response in a data file must not
    cost gigabytes). The text is cut only where a word ends and whitespace begins — a pre-token boundary of BPE and
    SentencePiece tokenizers, so the tokens before the cut are those of the whole text — at growing lengths until
    the part has more than ``n`` tokens, and two cuts agree. Tested equal to ``tokenize(text)[:n]``; a text with no
    such boundary far enough in is tokenised whole."""
    return _bounded(tokenizer, text, n, head=True)


def tail_tokens(tokenizer, text: str, n: int) -> list[int]:
    """The last ``n`` token ids of ``text`` (the mirror of :func:`head_tokens`: suffixes from a word boundary)."""
    return _bounded(tokenizer, text, n, head=False)


def _boundary(text: str, at: int, forward: bool) -> int | None:
    """The first (forward) or last (backward) index i from ``at`` with text[i] whitespace after a non-space."""
    rng = range(max(at, 1), len(text)) if forward else range(min(at, len(text) - 1), 0, -1)
    for i in rng:
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return None


def _bounded(tokenizer, text: str, n: int, head: bool) -> list[int]:
    def part(ids: list[int]) -> list[int]:
        return ids[:n] if head else ids[len(ids) - n:]

    window, previous = (n + 1) * CHARS_PER_TOKEN, None
    while n and window < len(text):
        cut = _boundary(text, window if head else len(text) - window, forward=head)
        if cut is None:
            break
        ids = _ids(tokenizer, text[:cut] if head else text[cut:])
        if len(ids) > n:
            if previous is not None and part(previous) == part(ids):
                return part(ids)
            previous = ids
        window *= 2
    ids = _ids(tokenizer, text)
    return part(ids) if n and len(ids) > n else ids


def encode_prompts(prompts: Sequence[Prompt], tokenizer, max_tokens: int) -> list[list[int]]:
    """Token ids of rendered prompts, keeping the *last* ``max_tokens`` (the end of a prompt matters most)."""
    out = []
    for p in prompts:
        text = render_prompt(p, tokenizer)
        out.append(tail_tokens(tokenizer, text, max_tokens) if max_tokens else _ids(tokenizer, text))
    return out


def encode_responses(texts: Sequence[str], tokenizer, max_tokens: int, *, add_eos: Sequence[bool] | bool = True):
    """Token ids of response texts, truncated to ``max_tokens``; EOS appended where the response ended."""
    flags = [add_eos] * len(texts) if isinstance(add_eos, bool) else list(add_eos)
    out = []
    for text, eos in zip(texts, flags):
        ids = head_tokens(tokenizer, text, max_tokens)
        if eos:
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids[:max_tokens])
    return out


class InverseCDFSampler:
    """A logits processor that samples: each row's next token is drawn from softmax(scores / temperature) by
    inverting its CDF with one uniform draw (float64 softmax and cumulative sum, ``searchsorted``), and every
    other token's score is set to -inf, so generate's greedy step picks the drawn one.

    The distribution is the one ``torch.multinomial`` samples, from one random number per row instead of one
    per vocabulary entry: multinomial's ``exponential_`` over a (16, 49152) tensor took 29-31 ms on this CPU
    (2 threads) against 3.5 ms for the inverse CDF; it was 10-14% of a 16 x 32-token generation with SmolLM2-135M.
    Draws come from torch's global generator (``sample`` seeds it per batch). Tested: its frequencies match
    softmax(logits / T) (tests/test_ppo.py) and a zero-probability token is never drawn (tests/test_models.py).
    """

    def __init__(self, temperature: float = 1.0, record: bool = False):
        if not temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        # with ``record``, each step's (B,) log-probs of the drawn tokens under softmax(scores / temperature)
        self.logps: list[torch.Tensor] | None = [] if record else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = draw_tokens(scores, self.temperature)
        if self.logps is not None:
            self.logps.append(gather_logprobs(scores.float() / self.temperature, tokens))
        return one_hot_scores(tokens, scores)


def draw_tokens(scores: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) tokens, row b drawn from softmax(scores[b] / temperature) by inverse CDF (one uniform per row).

    The softmax runs in float32 (each probability to float32 rounding) and only the cumulative sum in float64
    (so a probability of 1e-7 keeps its share of the CDF over a 49k vocabulary). The naive form, float64
    throughout (``softmax(scores.double() / T).cumsum``), drew the same tokens (tests/test_models.py) but held
    three (B, V) float64 tensors at once: at 64 x 49152 its chain of fresh 25 MB buffers ran 22-34 ms a step on
    this CPU (2 threads) against 3 ms, and a 64 x 16-token generation with SmolLM2-135M took 5.6-5.9 s against
    4.8-5.1 s, the same samples (alternated in one process)."""
    logits = scores.float() if temperature == 1.0 else scores.float() / temperature
    cdf = torch.softmax(logits, dim=-1).double().cumsum_(-1)
    del logits
    u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device, generator=generator)
    # scaling by the last entry makes the CDF end exactly at the total; right=True skips tokens of probability 0
    # (their CDF equals their predecessor's), and clamping covers u * total rounding onto the total itself
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1).squeeze(-1)


def one_hot_scores(tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Scores that are 0 at each row's token and -inf elsewhere (what greedy decoding turns back into it)."""
    out = torch.full_like(scores, float("-inf"))
    return out.scatter_(1, tokens.unsqueeze(-1), 0.0)


@torch.no_grad()
def sample(
    lm,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    on_batch=None,
    dist=None,
    logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Sample one response per prompt (pure sampling: no top-k/top-p, so log-probs under ``temperature`` are the
    sampling distribution). A response is cut after its first EOS (kept: ending is an action). Batch ``j`` is
    seeded with ``seed + j``, so the same prompts and seed give the same noise to every policy.

    ``logprobs``: also return each response's sum_t log pi(y_t | .) at ``temperature``, from the logits the tokens
    were drawn from (the KV-cached decoding steps): what a second forward pass over prompt + response computes
    (:func:`response_logprobs`, to float rounding; tested against it), without that pass.

    ``dist`` (accelerate's state, several processes): every rank passes the same prompts, samples the batches
    ``j`` with ``j % world == rank`` and receives all of them -- exactly the one-process samples, in 1/world of
    the time. (Online methods sample their own prompts per rank and pass no ``dist``.)
    """
    if dist is not None and dist.num_processes > 1:
        from accelerate.utils import gather_object

        starts = list(range(0, len(prompt_ids), batch_size))
        mine = []
        for j in range(dist.process_index, len(starts), dist.num_processes):
            chunk = prompt_ids[starts[j] : starts[j] + batch_size]
            part = sample(lm, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed + j, batch_size=batch_size, on_batch=on_batch, logprobs=logprobs)
            mine.append((j, part if logprobs else (part, [])))
        parts = [part for _, part in sorted(gather_object(mine))]
        responses = [r for rs, _ in parts for r in rs]
        return (responses, [x for _, lps in parts for x in lps]) if logprobs else responses
    responses: list[list[int]] = []
    seq_logps: list[float] = []
    for rows, logps, _ in _draw(lm, tokenizer, prompt_ids, max_new_tokens, temperature, seed, batch_size,
                                logprobs=logprobs, states=False, on_batch=on_batch):
        responses += rows
        seq_logps += [float(lp.sum()) for lp in logps or ()]
    return (responses, seq_logps) if logprobs else responses


@torch.no_grad()
def sample_states(lm, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                  seed: int = 0, batch_size: int = 64) -> tuple[list[list[int]], list[torch.Tensor]]:
    """:func:`sample` (the same responses for the same arguments), plus for each response the decoder's last hidden
    states that predicted its tokens, (len(response), H): what :func:`response_hidden` takes from a second forward
    pass over prompt + response (to float rounding; tested against it), read off the KV-cached decoding steps. The
    LM head or a value head on them gives the rollout's log-probs and values without that pass."""
    responses: list[list[int]] = []
    states: list[torch.Tensor] = []
    for rows, _, st in _draw(lm, tokenizer, prompt_ids, max_new_tokens, temperature, seed, batch_size,
                             logprobs=False, states=True):
        responses += rows
        states += st
    return responses, states


def _draw(lm, tokenizer, prompt_ids, max_new_tokens, temperature, seed, batch_size, *, logprobs: bool, states: bool,
          on_batch=None):
    """One process's sampling, batch by batch: (responses, per-row (len,) log-probs or None, per-row (len, H)
    states or None). Batch ``j`` is seeded with ``seed + j``."""
    from transformers import GenerationConfig, LogitsProcessorList

    # decoding is greedy on what InverseCDFSampler leaves: exactly one token per row, drawn from
    # softmax(logits / temperature) (the sampler, not generate's multinomial; see its docstring)
    gen_cfg = GenerationConfig(
        do_sample=False,
        temperature=None,
        top_k=None,
        top_p=None,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = next(lm.parameters()).device
    eos = tokenizer.eos_token_id
    # generate's own check for `logits_to_keep` reads the outer forward's signature, which a peft wrapper hides:
    # asked for explicitly, the prompt's pass runs the LM head on its last position only, not on all of them
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(lm) else {}
    seen: list[torch.Tensor] = []  # the decoder's last hidden state at the newest position, one per forward
    hook = lm.get_decoder().register_forward_hook(
        lambda module, args, out: seen.append(_last_hidden(out)[:, -1].detach())) if states else None
    try:
        for j, start in enumerate(range(0, len(prompt_ids), batch_size)):
            sampler = InverseCDFSampler(temperature, record=logprobs)
            processors = LogitsProcessorList([sampler])
            chunk = prompt_ids[start : start + batch_size]
            P = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), P), tokenizer.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, P - len(p) :] = torch.tensor(p)
                attn[i, P - len(p) :] = 1
            seen.clear()
            torch.manual_seed(seed + j)
            out = lm.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen_cfg,
                              logits_processor=processors, **keep)
            n_new = out.shape[1] - P
            steps = torch.stack(sampler.logps, dim=1).double() if logprobs else None  # (B, steps generated)
            if states:  # one forward per generated token: the prompt's pass, then each token but the last
                if len(seen) != n_new:
                    raise RuntimeError(f"sampling ran {len(seen)} forward passes for {n_new} tokens")
                hidden = torch.stack(seen, dim=1)  # (B, steps generated, H)
            rows, row_logps, row_states = [], [] if logprobs else None, [] if states else None
            for i, row in enumerate(out[:, P:].tolist()):
                cut = row.index(eos) + 1 if eos in row else len(row)
                rows.append(row[:cut])
                if logprobs:
                    row_logps.append(steps[i, :cut])
                if states:
                    row_states.append(hidden[i, :cut].clone())
            del out, steps, sampler
            seen.clear()
            hidden = None
            release_heap()  # the KV cache just freed: its pages go back before whatever runs next
            yield rows, row_logps, row_states
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        if hook is not None:
            hook.remove()


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _takes_logits_to_keep(lm) -> bool:
    import inspect

    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def ends_with_eos(response_ids: Sequence[Sequence[int]], eos_id: int) -> list[bool]:
    return [len(r) > 0 and r[-1] == eos_id for r in response_ids]


def decode_responses(response_ids: Sequence[Sequence[int]], tokenizer) -> list[str]:
    return tokenizer.batch_decode(response_ids, skip_special_tokens=True)


__all__ = [
    "SeqBatch",
    "make_batch",
    "hidden_states",
    "response_hidden",
    "response_logits",
    "gather_logprobs",
    "entropy_from_logits",
    "logprob_stats",
    "head_stats",
    "response_logprobs",
    "last_token_hidden",
    "mean_response_hidden",
    "render_prompt",
    "encode_prompts",
    "encode_responses",
    "sample",
    "sample_states",
    "ends_with_eos",
    "decode_responses",
]
