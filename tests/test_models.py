"""The shared base: reference = adapters off = base, padding invariance, sampling, LoRA-only updates."""

from types import SimpleNamespace

import pytest
import torch

from prefopt.backends import dpo as dpo_backend
from prefopt.backends._common import TrainData
from prefopt.data.records import PreferencePair
from prefopt.models.base import ModelError, resolve_model
from prefopt.models.ops import encode_prompts, make_batch, response_logprobs, sample
from prefopt.models.shared import LoraSettings, SharedBase


def _logits(lm, ids):
    return lm(input_ids=ids).logits


def _perturb_adapters(shared):
    # LoRA B starts at zero (adapter = identity); make it non-zero so "adapters on" really differs
    with torch.no_grad():
        for n, p in shared.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)


def test_reference_equals_disabled_adapters_equals_base(tiny):
    lm, tok = tiny
    ids = torch.tensor([tok("the movie was").input_ids])
    base_logits = _logits(lm, ids).clone()
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    shared.add_role("ppo", head=True)
    shared.add_role("dpo")
    _perturb_adapters(shared)
    with shared.role("dpo") as m:
        policy_logits = _logits(m, ids)
    with shared.reference() as m:
        ref_logits = _logits(m, ids)
    with shared.peft.disable_adapter():
        disabled = shared.peft(input_ids=ids).logits
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)  # the adapter does something
    assert torch.allclose(ref_logits, base_logits, atol=1e-6)
    assert torch.allclose(disabled, base_logits, atol=1e-6)
    # one set of base weights: roles share the very same tensors
    with shared.role("ppo") as a, shared.role("dpo") as b:
        assert a.get_output_embeddings().weight.data_ptr() == b.get_output_embeddings().weight.data_ptr()


def test_roles_are_separate_adapters(tiny):
    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    shared.add_role("first")
    shared.add_role("second")
    _perturb_adapters(shared)
    ids = torch.tensor([tok("abc").input_ids])
    with shared.role("first") as m:
        la = _logits(m, ids)
    with shared.role("second") as m:
        lb = _logits(m, ids)
    assert not torch.allclose(la, lb, atol=1e-4)


def test_logprobs_do_not_depend_on_padding(tiny):
    lm, tok = tiny
    prompts = encode_prompts(["hi", "a much longer prompt here"], tok, 64)
    responses = [tok(" there").input_ids, tok(" ok").input_ids + [tok.eos_token_id]]
    together = response_logprobs(lm, make_batch(prompts, responses, tok.pad_token_id, "cpu"))
    for i in range(2):
        alone = response_logprobs(lm, make_batch([prompts[i]], [responses[i]], tok.pad_token_id, "cpu"))
        n = len(responses[i])
        assert torch.allclose(together[i, :n], alone[0, :n], atol=1e-5)
        assert torch.all(together[i, n:] == 0)


def test_batch_masks_come_from_lengths_not_ids(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # like SmolLM2
    b = make_batch([[5, 6], [7]], [[8, eos], [9]], pad_id=eos, device="cpu")
    assert b.input_ids.tolist() == [[5, 6, 8, eos], [eos, 7, 9, eos]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 1]]
    assert b.response_mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]  # the emitted EOS counts, the pad does not


def test_sample_is_seeded_and_cut_at_eos(tiny):
    lm, tok = tiny
    prompts = encode_prompts(["one", "two", "three"], tok, 64)
    a = sample(lm, tok, prompts, max_new_tokens=12, seed=3)
    b = sample(lm, tok, prompts, max_new_tokens=12, seed=3)
    c = sample(lm, tok, prompts, max_new_tokens=12, seed=4)
    assert a == b and a != c
    for r in a:
        assert 1 <= len(r) <= 12
        assert tok.eos_token_id not in r[:-1]


def test_greedy_generation_agrees_with_our_logprobs(tiny):
    """Generation and our forward must see the same distribution (positions, masks)."""
    lm, tok = tiny
    prompts = encode_prompts(["x", "a longer one"], tok, 64)
    resp = sample(lm, tok, prompts, max_new_tokens=6, seed=0, temperature=1e-4)  # ~greedy
    batch = make_batch(prompts, resp, tok.pad_token_id, "cpu")
    from prefopt.models.ops import hidden_states, response_logits

    logits = response_logits(lm, hidden_states(lm, batch), batch)
    for i, r in enumerate(resp):
        assert logits[i, : len(r)].argmax(-1).tolist() == r


def test_dpo_step_moves_lora_only(tiny):
    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    pairs = [PreferencePair(prompt=f"p{i}", chosen="good", rejected="bad") for i in range(4)]
    shared.add_role("dpo")
    before_lora, before_base = shared.adapter_state("dpo"), shared.base_state()
    cfg = dpo_backend.DPOConfig(batch_size=4, learning_rate=1e-2)
    dpo_backend.train(shared, cfg, TrainData(pairs=pairs))
    after_lora, after_base = shared.adapter_state("dpo"), shared.base_state()
    assert any(not torch.equal(before_lora[k], after_lora[k]) for k in before_lora)
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base)


def test_resolve_model_errors():
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model("/nowhere/model.gguf")
    assert resolve_model("some-org/some-model").path == "some-org/some-model"


def test_saved_policy_loads_with_peft_from_pretrained_and_matches(tiny, tmp_path):
    """A saved role is a plain PEFT adapter folder: PeftModel.from_pretrained(base, path) gives our logits."""
    from peft import PeftModel

    from prefopt.models.base import load_base

    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    shared.add_role("dpo", seed=0)
    shared.add_role("ppo", head=True, seed=0)
    _perturb_adapters(shared)
    shared.save_role("dpo", tmp_path / "dpo")
    shared.save_role("ppo", tmp_path / "ppo")
    assert {p.name for p in (tmp_path / "dpo").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert (tmp_path / "ppo" / "heads.safetensors").is_file()
    ids = torch.tensor([tok("the movie was").input_ids])
    with shared.role("dpo") as m:
        ours = _logits(m, ids)
    base, _ = load_base("tiny", device=torch.device("cpu"))  # a fresh copy of the same base
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "dpo"))(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6)
    # prefopt's own loader brings the head back too
    other = SharedBase(*load_base("tiny", device=torch.device("cpu")), LoraSettings(r=4, alpha=8))
    other.load_role("ppo", tmp_path / "ppo")
    with shared.role("ppo") as a, other.role("ppo") as b:
        assert torch.allclose(_logits(a, ids), _logits(b, ids), atol=1e-6)
    for k, v in shared.heads["ppo"].state_dict().items():
        assert torch.equal(v, other.heads["ppo"].state_dict()[k])


def test_seeded_roles_start_identical_and_leave_the_rng_alone(tiny):
    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    shared.add_role("pa", head=True, seed=7)
    shared.add_role("pb", head=True, seed=7)
    assert torch.equal(torch.rand(3), before)  # the global stream did not move
    a, b = shared.adapter_state("pa"), shared.adapter_state("pb")
    assert all(torch.equal(v, b[k.replace(".pa.", ".pb.")]) for k, v in a.items() if not k.startswith("head."))
    assert torch.equal(a["head.weight"], b["head.weight"])
    shared.add_role("pc", seed=8)
    c = shared.adapter_state("pc")
    assert any(not torch.equal(v, c[k.replace(".pa.", ".pc.")]) for k, v in a.items() if "lora_A" in k)


def test_one_rendering_for_every_prompt_shape():
    """Chat models see HH transcripts and message lists through their chat template; a model without one sees
    the plain template; plain prompts are left alone."""
    from prefopt.models.base import char_tokenizer
    from prefopt.models.ops import render_prompt

    hh = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Name a colour."}]
    chat = char_tokenizer()
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    want = "<|user|>Hi there\n<|assistant|>Hello!\n<|user|>Name a colour.\n<|assistant|>"
    assert render_prompt(hh, chat) == render_prompt(turns, chat) == want
    assert render_prompt("Review The Quiet Engine.", chat) == "Review The Quiet Engine."
    base = char_tokenizer()
    assert render_prompt(turns, base) == "Question: Hi there\n\nAnswer: Hello!\n\nQuestion: Name a colour.\n\nAnswer:"
    assert render_prompt(hh, base) == hh


def test_sft_merged_into_the_base_is_the_new_reference(tiny, tmp_path):
    """The SFT stage: the adapter merged into the base gives the same logits as base + adapter (and as peft's own
    loading of the saved adapter), and 'adapters off' on the merged base is the SFT model for later roles."""
    from peft import PeftModel

    from prefopt.backends import sft as sft_backend
    from prefopt.models.base import load_base
    from prefopt.models.ops import hidden_states, response_logits

    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    demos = [PreferencePair(prompt=f"say {c}", chosen=c * 5, rejected="-") for c in "abcdefgh"]
    sft_backend.train(shared, sft_backend.SFTConfig(batch_size=4, epochs=3, learning_rate=2e-2), TrainData(pairs=demos))
    ids = encode_prompts([d.prompt for d in demos], tok, 16)
    batch = make_batch(ids, [[5, 6, 7]] * len(ids), tok.pad_token_id, shared.device)

    def logits(ctx):
        with torch.no_grad(), ctx as model:
            return response_logits(model, hidden_states(model, batch), batch)

    with_adapter, base = logits(shared.role("sft")), logits(shared.reference())
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter learned something
    shared.save_role("sft", tmp_path / "sft")
    fresh, _ = load_base("tiny", device=torch.device("cpu"), seed=0)
    peft_lm = PeftModel.from_pretrained(fresh, str(tmp_path / "sft"))
    with torch.no_grad():
        assert torch.allclose(response_logits(peft_lm, hidden_states(peft_lm, batch), batch), with_adapter, atol=1e-5)

    merged = shared.merge_role("sft")
    assert torch.allclose(logits(merged.reference()), with_adapter, atol=1e-5)
    merged.add_role("dpo", seed=0)  # a later stage: its reference (adapters off) is the SFT model
    assert torch.allclose(logits(merged.reference()), with_adapter, atol=1e-5)
    assert torch.allclose(logits(merged.role("dpo")), with_adapter, atol=1e-5)  # LoRA B starts at 0
    with pytest.raises(ValueError, match="only role"):
        merged.merge_role("dpo") if merged.add_role("other") is None else None


def test_sft_loss_hand_computed():
    from prefopt.backends.sft import sft_loss

    logps = torch.tensor([[-1.0, -2.0, 99.0], [-0.5, 7.0, 7.0]])  # padding holds junk
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.isclose(sft_loss(logps, mask), torch.tensor((1.0 + 2.0 + 0.5) / 3))


def test_bounded_tokenisation_equals_the_naive_form():
    """head_tokens / tail_tokens tokenise only a window of a long text; they must equal tokenising all of it.
    Checked on SmolLM2's real BPE tokenizer (offline, from the GGUF) and the char tokenizer."""
    import random

    from prefopt.models.base import char_tokenizer, load_tokenizer
    from prefopt.models.ops import head_tokens, tail_tokens

    rng = random.Random(0)
    words = ["the", "film", "was", "wonderful", "!", "über", "naïve", "日本語", "  ", "\n\n", "x" * 300, "3.14159",
             "co-operate", "don't", "<br />", "😀"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 400))) for _ in range(60)]
    texts += ["a" * 5000, "ab" * 3000 + " end", "", "short"]
    for tok in (load_tokenizer("smollm2-135m-instruct"), char_tokenizer()):
        for text in texts:
            full = tok(text, add_special_tokens=False).input_ids
            for n in (1, 7, 32, 64):
                assert head_tokens(tok, text, n) == full[:n], (text[:40], n)
                assert tail_tokens(tok, text, n) == full[-n:], (text[-40:], n)


def test_column_major_weights_change_the_layout_not_the_model(tiny):
    """The frozen base's 2-D weights are stored transposed-contiguous on CPU (fast GEMM for decoding's few rows):
    same values, same Parameter objects (ties kept), same logits and samples; trainable weights untouched."""
    import copy

    from prefopt.models.shared import column_major_weights

    lm, tok = tiny
    row = copy.deepcopy(lm)
    col = copy.deepcopy(lm)
    tied = col.get_output_embeddings().weight is col.get_input_embeddings().weight
    frozen = {n: p.detach().clone() for n, p in col.named_parameters()}
    assert all(p.is_contiguous() for p in row.parameters())
    n = column_major_weights(col)
    assert n > 0
    for name, p in col.named_parameters():
        assert torch.equal(p, frozen[name]), name
        if p.dim() == 2 and min(p.shape) > 1:
            assert p.stride() == (1, p.shape[0]), name  # column-major
    assert (col.get_output_embeddings().weight is col.get_input_embeddings().weight) == tied
    assert column_major_weights(col) == 0  # idempotent: nothing left to convert
    ids = torch.tensor([tok("the movie was great").input_ids] * 3)
    with torch.no_grad():
        assert torch.allclose(row(input_ids=ids).logits, col(input_ids=ids).logits, atol=1e-5, rtol=0)
    prompts = encode_prompts(["one", "two", "three"], tok, 64)
    assert sample(row, tok, prompts, max_new_tokens=8, seed=5) == sample(col, tok, prompts, max_new_tokens=8, seed=5)
    shared = SharedBase(col, tok, LoraSettings(r=4, alpha=8))  # SharedBase converts the base it is given...
    shared.add_role("dpo")
    lora = [p for n, p in shared.peft.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.is_contiguous() for p in lora)  # ...not the adapters


def test_inverse_cdf_sampler_draws_softmax_and_never_a_zero_probability_token():
    """The sampler behind `sample`: token frequencies of 200k draws match softmax(logits / T); a token of
    probability 0 (-inf logit, or underflow) is never drawn, wherever it sits; greedy on its scores returns it."""
    from prefopt.models.ops import InverseCDFSampler, draw_tokens, one_hot_scores

    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf"), 2.0, 0.5, float("-inf")]])
    n = 200_000
    for T in (1.0, 0.5):
        g = torch.Generator().manual_seed(0)
        drawn = draw_tokens(logits.expand(n, -1), T, generator=g)
        freq = torch.bincount(drawn, minlength=logits.shape[1]).double() / n
        p = torch.softmax(logits[0].double() / T, -1)
        assert freq[[0, 3, 6]].sum() == 0
        assert (freq - p).abs().max() < 0.005, (freq, p)  # 5 sigma of the largest p(1-p)/n is ~0.0056
    scores = torch.randn(4, 9)
    tokens = draw_tokens(scores, 1.0, generator=torch.Generator().manual_seed(1))
    assert one_hot_scores(tokens, scores).argmax(-1).tolist() == tokens.tolist()
    # a huge logit gap: every other token underflows to probability 0 in float64 and is never drawn
    peaked = torch.tensor([[0.0, 900.0, 0.0]]).expand(1000, -1)
    assert draw_tokens(peaked, 1.0, generator=torch.Generator().manual_seed(2)).eq(1).all()
    with pytest.raises(ValueError, match="temperature"):
        InverseCDFSampler(0.0)


def test_inverse_cdf_draws_equal_the_float64_naive_form():
    """draw_tokens (float32 softmax, float64 CDF) against the naive form, float64 throughout, on the same uniforms:
    the same token in every one of 2 x 512 rows of a 49k vocabulary, at two temperatures."""
    from prefopt.models.ops import draw_tokens

    for T, seed in ((1.0, 0), (0.7, 1)):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(512, 49152, generator=g) * 4
        u = torch.rand(scores.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        cdf = torch.softmax(scores.double() / T, dim=-1).cumsum(-1)
        naive = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=scores.shape[-1] - 1).squeeze(-1)
        del cdf
        fast = draw_tokens(scores, T, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(fast, naive)


def test_a_converted_gguf_base_is_kept_and_loads_back_as_the_same_model(tmp_path, monkeypatch):
    """The first load of a GGUF base converts it and keeps the result; the next loads read that folder: the same
    weights (bit for bit, ties kept), the same tokenizer (ids, special tokens, chat template), the same logits."""
    from prefopt.models.base import converted_base_dir, load_base, load_tokenizer, resolve_model

    monkeypatch.setenv("PREFOPT_BASE_CACHE", str(tmp_path / "bases"))
    spec, cpu = "smollm2-135m-instruct", torch.device("cpu")
    folder = converted_base_dir(resolve_model(spec))
    assert folder.parent == tmp_path / "bases" and not folder.exists()
    gguf_lm, gguf_tok = load_base(spec, device=cpu)
    assert (folder / "prefopt-source.json").is_file() and not list(folder.parent.glob("*.tmp-*"))
    lm, tok = load_base(spec, device=cpu)  # from the folder
    a, b = gguf_lm.state_dict(), lm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    ids = torch.tensor([gguf_tok("The movie was").input_ids])
    with torch.no_grad():
        assert torch.equal(gguf_lm(input_ids=ids).logits, lm(input_ids=ids).logits)
    texts = ["Hello world", "The movie was", "über naïve 日本語 😀", "<|im_start|>user\nhi<|im_end|>", "  \n\n x"]
    chat = [{"role": "user", "content": "Write a review."}]
    for t in (tok, load_tokenizer(spec)):
        assert [t(x).input_ids for x in texts] == [gguf_tok(x).input_ids for x in texts]
        assert t.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert (t.eos_token_id, t.pad_token_id, t.bos_token_id, t.padding_side, len(t)) == \
            (gguf_tok.eos_token_id, gguf_tok.pad_token_id, gguf_tok.bos_token_id, "left", len(gguf_tok))
    # a kept folder that cannot be read (a disk error, a hand edit) is a warning: the GGUF is converted again
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="could not be read"):
        again, _ = load_base(spec, device=cpu)
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)
    assert (folder / "prefopt-source.json").is_file() and (folder / "model.safetensors").stat().st_size > 10**8
    # the conversion parses the GGUF once for tokenizer, config and weights (_gguf_parsed_once): the same model and
    # tokenizer as transformers' own three parses
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    plain = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32).state_dict()
    assert plain.keys() == a.keys() and all(torch.equal(a[k], plain[k]) for k in a)
    plain_tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    assert plain_tok.get_vocab() == gguf_tok.get_vocab() and plain_tok.chat_template == gguf_tok.chat_template
    assert [plain_tok(x).input_ids for x in texts] == [gguf_tok(x).input_ids for x in texts]
    import gguf

    assert gguf.GGUFReader.__name__ == "GGUFReader"  # the patch is gone after the load
    monkeypatch.setenv("PREFOPT_BASE_CACHE", "off")
    assert converted_base_dir(resolve_model(spec)) is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_recorded_while_sampling_equal_a_forward_pass(tiny, temperature):
    """The evaluation's log pi(y) comes from the decoding steps (KV cache, left-padded batches) instead of a second
    forward pass: the naive form is response_logprobs over prompt + response, and the samples are unchanged."""
    lm, tok = tiny
    prompts = encode_prompts(["x", "a longer one", "two words", "a b c d e f g", "q", "mid size prompt", "z z"], tok, 64)
    # the tiny model never draws its EOS: let a token it draws often end responses instead
    drawn = [t for r in sample(lm, tok, prompts, max_new_tokens=10, seed=5, temperature=temperature, batch_size=3) for t in r]
    stop = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=max(set(drawn), key=drawn.count))
    plain = sample(lm, stop, prompts, max_new_tokens=10, seed=5, temperature=temperature, batch_size=3)
    resp, logps = sample(lm, stop, prompts, max_new_tokens=10, seed=5, temperature=temperature, batch_size=3, logprobs=True)
    assert resp == plain
    ends = [r[-1] == stop.eos_token_id for r in resp]
    assert any(ends) and not all(ends)  # both cuts: at an EOS, and at the length cap
    batch = make_batch(prompts, resp, tok.pad_token_id, "cpu")
    with torch.no_grad():
        naive = response_logprobs(lm, batch, temperature).sum(-1).double()
    assert torch.allclose(torch.tensor(logps, dtype=torch.float64), naive, rtol=1e-5, atol=1e-4)


def test_states_recorded_while_sampling_equal_a_forward_pass(tiny):
    """PPO's rollout log-probs and values read the trunk states of the KV-cached decoding steps instead of a second
    forward pass: the naive form is response_hidden over prompt + response; the responses are sample()'s."""
    from prefopt.models.ops import hidden_states, response_hidden, sample_states

    lm, tok = tiny
    prompts = encode_prompts(["x", "a longer one", "two words", "a b c d e f g", "q", "mid size prompt", "z z"], tok, 64)
    drawn = [t for r in sample(lm, tok, prompts, max_new_tokens=10, seed=5, batch_size=3) for t in r]
    stop = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=max(set(drawn), key=drawn.count))
    resp, states = sample_states(lm, stop, prompts, max_new_tokens=10, seed=5, batch_size=3)
    assert resp == sample(lm, stop, prompts, max_new_tokens=10, seed=5, batch_size=3)
    ends = [r[-1] == stop.eos_token_id for r in resp]
    assert any(ends) and not all(ends)  # rows that stopped early beside rows that ran to the cap
    batch = make_batch(prompts, resp, tok.pad_token_id, "cpu")
    with torch.no_grad():
        naive = response_hidden(hidden_states(lm, batch), batch)
    for i, r in enumerate(resp):
        assert states[i].shape == (len(r), naive.shape[-1])
        assert torch.allclose(states[i], naive[i, : len(r)], rtol=1e-4, atol=1e-5)


def test_fused_lora_forward_equals_peft_forward_and_backward(tiny):
    """The addmm LoRA forward against peft's own (``base(x) + B(A(x)) * scaling``): the same logits and the same
    gradients of every adapter weight, with two roles, one active; adapters off is the base."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=12))  # scaling 3: a wrong alpha placement shows
    shared.add_role("pol", seed=1)
    shared.add_role("other", seed=2)
    _perturb_adapters(shared)
    layers = [m for m in shared.lm.modules() if type(m) is LoraLinear]
    assert layers and all("forward" in vars(m) for m in layers)  # every LoRA layer runs the fused forward
    ids = torch.tensor([tok("the movie was great").input_ids] * 3)

    def run():
        params = shared.adapter_parameters("pol")
        for p in params:
            p.grad = None
        with shared.role("pol") as m:
            out = m(input_ids=ids).logits
        out.pow(2).mean().backward()
        with torch.no_grad(), shared.reference() as m:
            ref = m(input_ids=ids).logits
        return out.detach(), [p.grad.clone() for p in params], ref

    fused = run()
    for m in layers:
        del m.forward  # back to peft's class forward
    plain = run()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused[0], fused[2])  # the adapter really changes the output
    for g_fused, g_plain in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused[2], plain[2], rtol=0, atol=0)  # reference: peft's own path, base only


def test_mean_response_hidden_equals_a_loop_over_rows():
    """The pooled state is each row's mean over its own response tokens (padding left out); an empty response
    falls back to the prompt's last token."""
    from prefopt.models import ops

    batch = ops.make_batch([[5, 6, 7], [8], [9, 10]], [[1, 2, 3, 4], [1], []], pad_id=0, device="cpu")
    hidden = torch.randn(3, batch.input_ids.shape[1], 4, generator=torch.Generator().manual_seed(0))
    got = ops.mean_response_hidden(hidden, batch)
    P = batch.prompt_width
    for i, n in enumerate(batch.response_lengths.tolist()):
        want = hidden[i, P : P + n].mean(0) if n else hidden[i, P - 1]
        torch.testing.assert_close(got[i], want)


def test_mean_response_hidden_leaves_out_the_excluded_token():
    """``exclude`` (EOS, for 'content' pooling) leaves that token's positions out of each row's mean; a row with
    nothing else -- only EOS, or empty -- gets the prompt's last state, the same as an empty response."""
    from prefopt.models import ops

    eos = 2
    responses = [[1, 3, 4, eos], [eos], [], [5, 6], [eos, 7]]
    batch = ops.make_batch([[5, 6, 7], [8], [9, 10], [11], [12, 13]], responses, pad_id=0, device="cpu")
    hidden = torch.randn(5, batch.input_ids.shape[1], 4, generator=torch.Generator().manual_seed(1))
    got = ops.mean_response_hidden(hidden, batch, exclude=eos)
    P = batch.prompt_width
    for i, r in enumerate(responses):
        kept = [P + t for t, tok in enumerate(r) if tok != eos]
        want = hidden[i, kept].mean(0) if kept else hidden[i, P - 1]
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(ops.mean_response_hidden(hidden, batch)[3], got[3])  # no EOS: the plain mean


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_autograd_graph_bit_for_bit(tiny, temperature):
    """The fused log-prob function (in-place backward) against gather_logprobs(response_logits(...)): the same
    forward values and the same gradients into the trunk states and the head's weight, to the bit; and a head
    the function does not take (a bias) goes the plain way with the same values."""
    from prefopt.models.ops import gather_logprobs, hidden_states, response_logits, response_token_logprobs

    lm, tok = tiny
    prompts = encode_prompts(["x", "a longer one", "mid"], tok, 64)
    resp = sample(lm, tok, prompts, max_new_tokens=7, seed=3)
    batch = make_batch(prompts, resp, tok.pad_token_id, "cpu")
    hidden = hidden_states(lm, batch).detach()
    head = lm.get_output_embeddings()
    weight_grad = head.weight.requires_grad
    head.weight.requires_grad_(True)
    try:
        grads = []
        for fn in (lambda h: gather_logprobs(response_logits(lm, h, batch, temperature), batch.response_ids),
                   lambda h: response_token_logprobs(lm, h, batch, temperature)):
            h = hidden.clone().requires_grad_(True)
            head.weight.grad = None
            out = fn(h)
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # an arbitrary upstream grad
            (out * w * batch.response_mask).sum().backward()
            grads.append((out.detach(), h.grad, head.weight.grad.clone()))
        (o0, h0, w0), (o1, h1, w1) = grads
        assert o0.shape == o1.shape == batch.response_ids.shape
        assert torch.equal(o0, o1) and torch.equal(h0, h1) and torch.equal(w0, w1)
        assert h0.abs().sum() > 0 and w0.abs().sum() > 0
        h = hidden.clone().requires_grad_(True)  # its backward overwrites the logits it saved: once, then refused
        out = response_token_logprobs(lm, h, batch, temperature).sum()
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward pass"):
            out.backward()
    finally:
        head.weight.grad = None
        head.weight.requires_grad_(weight_grad)
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_()

    class WithBias(torch.nn.Module):
        def get_output_embeddings(self):
            return biased

    plain = gather_logprobs(response_logits(WithBias(), hidden, batch, temperature), batch.response_ids)
    assert torch.equal(response_token_logprobs(WithBias(), hidden, batch, temperature), plain)
