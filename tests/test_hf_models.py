"""Real models: a small Llama-style decoder and a BERT-style encoder from a ``transformers`` config
(offline, random weights), with every ``nn.Linear`` made sparse by ``sparsify_`` (each weight pattern)
or activation-sparse by ``sparsify_activations_``.

The reference is the *dense twin*: a deep copy of the original HF model in fp64 whose ``nn.Linear``
weights are the sparse layers' dense weights, written as a ``torch.nn.utils.parametrize`` of the
twin's own parameters (``weight * mask``, plus ``u @ v`` for Pixelfly, ``monarch_dense(L, R)`` for
Monarch), so the twin's parameter gradients are the dense gradients on the mask and AdamW on the
twin is AdamW on the masked weights. Activation-sparse layers get a forward pre-hook on the twin's
linear that applies the sparsifier to its input (``reference.act.act_mask`` with the layer's
calibrated threshold; a full sort for ``topk``).

``topk`` mode: the layer treats an input that top-k keeps but that is exactly 0 as inactive (no
gradient), and the twin follows it. Where a row has fewer than k nonzeros that is not the true
derivative (a kept 0 moved off 0 stays kept, so its derivative is 1; e.g. ``x = [1, 2, 0, 0, 0, 0, 0, 0]``
at sparsity 0.5 gets dx = 0 at x[2], a finite difference gives ``(dy @ W)[2]``). These models meet it
only on all-zero rows (the zero pad embedding after RMSNorm), where every input ties and there is no
derivative to get right.

Checked per pattern: forward (logits), backward (``inputs_embeds`` and every parameter gradient,
sparse ones gathered on the mask), greedy ``generate`` for the decoder, a few AdamW steps (the masks
stay exact, the loss falls, the trajectory is the twin's). ``torch.compile(fullgraph=True)`` of a
``LlamaDecoderLayer`` and a ``BertLayer`` with mixed patterns (aot_eager, forward and backward) and of
a sparsified ``LlamaMLP`` (inductor) against eager mode.

fp32 models run the C++ kernels and are held to ``helpers.TOL`` against the fp64 twin (training: 1e-3
on AdamW's change after 4 steps, since Adam divides by the gradient's own scale); fp64 models run the
reference ops. Measured worst errors are 40x (fp32 forward), 16x (fp32 gradients) and 8x (training)
under the tolerances.
"""

import copy

import pytest
import torch
from helpers import TOL, assert_close_rms
from torch import nn
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers")

from sparseops import (  # noqa: E402
    NM,
    ActivationSparseLinear,
    Block,
    Butterfly,
    FanIn,
    Monarch,
    MonarchLinear,
    SparseLinear,
    calibrate_,
    sparsify_,
    sparsify_activations_,
)
from sparseops.reference.act import act_mask  # noqa: E402
from sparseops.reference.monarch import monarch_dense  # noqa: E402

VOCAB, HIDDEN, INTER, PAD = 128, 64, 128, 0
SEED = 1234

# every weight pattern sparsify_ takes, sized for the layers of these configs (64, 32 and 128 wide)
PATTERNS = {
    "unstructured-sp0.5": ("unstructured", 0.5),
    "unstructured-sp0.9": ("unstructured", 0.9),
    "2:4": ("2:4", None),
    "2:8T": (NM(2, 8, transposable=True), None),
    "fanin16": (FanIn(16), None),
    "block16-sp0.5": (Block(16), 0.5),
    "pixelfly8x2b8-r4": (Butterfly(butterfly_size=8, n_factors=2, block=8, rank=4), None),
    "monarch4": (Monarch(4), None),
}
# activation sparsity: (mode, weight pattern applied first or None)
ACT_CASES = {
    "act-tensor": ("tensor", None),
    "act-channel": ("channel", None),
    "act-topk": ("topk", None),
    "act-relu": ("relu", None),
    "act-tensor+2:4": ("tensor", "2:4"),
}
ACT_SPARSITY = 0.5
ARCHS = ("llama", "bert")


# ---- the models ----


def _config(arch):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
                  attn_implementation="eager", pad_token_id=PAD)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **common)
    # untied: sparsify_ swaps the decoder for a SparseLinear, which could not share the embedding's weight
    return transformers.BertConfig(type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   **common)


_ORIGINALS = {}
_SPARSIFIED = {}


def _original(arch):
    """The dense HF model (fp32, eval mode), built once per arch under a fixed seed."""
    if arch not in _ORIGINALS:
        torch.manual_seed(SEED)
        cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.BertForMaskedLM
        _ORIGINALS[arch] = cls(_config(arch)).eval()
    return _ORIGINALS[arch]


def _batch(batch, seq, seed, left=False):
    """``(input_ids, attention_mask)``: random tokens, the last row padded by 2 on the right, or on the left
    (as a decoder generates from; fp64 models cannot take it, see ``test_sparsify_hf_decoder_generate...``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    pad = slice(0, 2) if left else slice(seq - 2, seq)
    ids[-1, pad] = PAD
    am[-1, pad] = 0
    return ids, am


def _build(arch, case):
    model = copy.deepcopy(_original(arch))
    torch.manual_seed(SEED)
    if case in PATTERNS:
        pattern, sparsity = PATTERNS[case]
        sparsify_(model, sparsity, pattern=pattern)
        return model
    mode, weight_pattern = ACT_CASES[case]
    if weight_pattern is not None:
        sparsify_(model, pattern=weight_pattern)
    sparsify_activations_(model, ACT_SPARSITY, mode=mode)
    # calibrated on other tokens than the ones the tests run: a test input sitting exactly on a
    # threshold would make the comparison a coin flip
    calibrate_(model, [dict(zip(("input_ids", "attention_mask"), _batch(4, 8, seed=99)))])
    return model


def _models(arch, case, dtype=torch.float32, twin_dtype=torch.float64):
    """``(sparse, twin)``: fresh copies of the sparsified model (cached per case: the transposable
    2:8 masks take seconds) and its dense twin (fp64 unless told)."""
    if (arch, case) not in _SPARSIFIED:
        _SPARSIFIED[arch, case] = _build(arch, case)
    # an fp64 model is the fp32 one converted: the same masks and thresholds
    sparse = copy.deepcopy(_SPARSIFIED[arch, case]).to(dtype)
    return sparse, _dense_twin(_original(arch), sparse, twin_dtype)


def _sparse_layers(model):
    """``{name: layer}`` of the layers that replaced an ``nn.Linear`` (a SparseLinear wrapped by an
    ActivationSparseLinear is the wrapper's ``sparse``, not listed on its own)."""
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, (SparseLinear, MonarchLinear, ActivationSparseLinear))}
    wrapped = {f"{n}.sparse" for n, m in found.items() if isinstance(m, ActivationSparseLinear)}
    return {n: m for n, m in found.items() if n not in wrapped}


# ---- the dense twin ----


class _Masked(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


class _MaskedPlusLowRank(_Masked):
    def __init__(self, mask, u, v):
        super().__init__(mask)
        self.u = nn.Parameter(u.detach().clone())
        self.v = nn.Parameter(v.detach().clone())

    def forward(self, w):
        return w * self.mask + self.u @ self.v


class _MonarchWeight(nn.Module):
    def __init__(self, layer, dtype):
        super().__init__()
        self.b1 = nn.Parameter(layer.blkdiag1.detach().to(dtype).clone())
        self.b2 = nn.Parameter(layer.blkdiag2.detach().to(dtype).clone())
        self.shape = (layer.in_features, layer.out_features)

    def forward(self, w):
        return monarch_dense(self.b1, self.b2, *self.shape)


# relative distance to a sparsifier's decision boundary under which rounding may decide
AMBIGUOUS = 1e-4


class _ActReference:
    """Forward pre-hook: the twin's linear sees ``s(x)``, the activation-sparse layer's sparsifier
    (``reference.act.act_mask`` with the layer's threshold; a full sort per row for ``topk``).

    The two models' inputs to a layer differ by rounding, so an input within ``AMBIGUOUS`` (relative) of
    its threshold (``topk``: a row whose k-th and (k+1)-th magnitudes are that close) is decided from the
    sparse layer's own input, which a hook on that layer records (the sparse model runs first). Only the
    decision is taken from there, by this reference, never the sparse layer's result; such inputs are rare
    (``_check_act_reference``).
    """

    def __init__(self, layer):
        self.mode, self.keep = layer.mode, layer.keep
        self.threshold = layer.threshold.detach().clone()
        self.seen, self.kept, self.ambiguous = [], [], []
        layer.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.seen.append(args[0].detach())

    def _mask(self, x):
        """``(active, ambiguous)``, bool of ``x``'s shape."""
        x = x.detach()
        if self.mode == "topk":
            srt, order = x.abs().sort(dim=-1, descending=True)
            k = self.keep
            keep = torch.zeros(x.shape, dtype=torch.bool).scatter_(-1, order[..., :k], True)
            gap = (srt[..., k - 1] - srt[..., k]) / srt[..., k - 1]
            # the layer's convention: a kept exact 0 is inactive (see the module docstring)
            return keep & (x != 0), (gap < AMBIGUOUS).unsqueeze(-1).expand_as(keep)
        thr = self.threshold.to(x.dtype)
        active = act_mask(x, thr, self.mode == "relu")[1]
        if self.mode == "relu":
            # relu mode decides on the sign: an input near 0 moves the output by ~0 either way
            return active, torch.zeros_like(active)
        return active, (x.abs() - thr).abs() <= AMBIGUOUS * thr

    def __call__(self, module, args):
        (x,) = args
        active, ambiguous = self._mask(x)
        if self.seen:
            theirs = self.seen.pop(0)
            assert theirs.shape == x.shape, "the models called this layer on different shapes"
            if ambiguous.any():
                active = torch.where(ambiguous, self._mask(theirs.to(x.dtype))[0], active)
        self.kept.append(active.float().mean().item())
        self.ambiguous.append(ambiguous.float().mean().item())
        v = torch.relu(x) if self.mode == "relu" else x
        return (torch.where(active, v, torch.zeros((), dtype=x.dtype)),)


def _dense_twin(original, sparse, dtype=torch.float64):
    """A deep copy of ``original`` in ``dtype`` computing what ``sparse`` should, with plain ``nn.Linear`` math."""
    twin = copy.deepcopy(original).to(dtype)
    twin.act_refs = {}
    for name, layer in _sparse_layers(sparse).items():
        lin = twin.get_submodule(name)
        assert type(lin) is nn.Linear, f"{name}: the twin's layer is {type(lin).__name__}"
        act = None
        if isinstance(layer, ActivationSparseLinear):
            act, layer = layer, layer.sparse
            if layer is None:
                assert torch.equal(act.weight.to(dtype), lin.weight), f"{name}: weight changed"
        if isinstance(layer, SparseLinear):
            mask = layer.mask
            on_mask = layer.format.to_dense(layer.values.detach()).to(dtype)
            # sparsify_ keeps the trained weights on the mask and nothing off it
            assert torch.equal(on_mask, torch.where(mask, lin.weight, 0.0)), f"{name}: not the weights on the mask"
            with torch.no_grad():
                lin.weight.copy_(on_mask)
            if isinstance(layer.pattern, Butterfly) and layer.pattern.rank:
                p = _MaskedPlusLowRank(mask, layer.lr_u.to(dtype), layer.lr_v.to(dtype))
            else:
                p = _Masked(mask)
            parametrize.register_parametrization(lin, "weight", p)
        elif isinstance(layer, MonarchLinear):
            parametrize.register_parametrization(lin, "weight", _MonarchWeight(layer, dtype))
        if layer is not None:
            assert (lin.bias is None) == (layer.bias is None)
            if lin.bias is not None:
                assert torch.equal(layer.bias.to(dtype), lin.bias), f"{name}: bias changed"
            # the twin's dense weight is the layer's own dense form
            w = layer.dense_weight().detach()
            assert_close_rms(w, lin.weight.detach(), w.dtype, name=f"{name} dense weight")
        if act is not None:
            ref = _ActReference(act)
            lin.register_forward_pre_hook(ref)
            twin.act_refs[name] = ref
    return twin


def _param_pairs(sparse, twin):
    """``[(name, sparse param, twin param, to_sparse)]`` covering every parameter of ``sparse``:
    ``to_sparse`` maps a twin tensor (the parameter or its gradient) into the sparse one's layout."""
    pairs, claimed = [], set()

    def add(name, p, q, fn=lambda t: t):
        pairs.append((name, p, q, fn))
        claimed.add(id(p))

    for name, layer in _sparse_layers(sparse).items():
        lin = twin.get_submodule(name)
        if isinstance(layer, ActivationSparseLinear):
            if layer.sparse is None:
                add(f"{name}.weight", layer.weight, lin.weight)
                if layer.bias is not None:
                    add(f"{name}.bias", layer.bias, lin.bias)
                continue
            layer = layer.sparse
        if parametrize.is_parametrized(lin):
            p = lin.parametrizations.weight[0]
            if isinstance(layer, SparseLinear):
                add(f"{name}.values", layer.values, lin.parametrizations.weight.original, layer.format.gather)
                if isinstance(p, _MaskedPlusLowRank):
                    add(f"{name}.lr_u", layer.lr_u, p.u)
                    add(f"{name}.lr_v", layer.lr_v, p.v)
            else:
                add(f"{name}.blkdiag1", layer.blkdiag1, p.b1)
                add(f"{name}.blkdiag2", layer.blkdiag2, p.b2)
        if layer.bias is not None:
            add(f"{name}.bias", layer.bias, lin.bias)
    for name, p in sparse.named_parameters():
        if id(p) not in claimed:
            add(name, p, twin.get_parameter(name))
    assert {id(p) for p in sparse.parameters()} == claimed
    return pairs


def _check_swapped(original, sparse, case):
    """Every ``nn.Linear`` was swapped, and the sparse layers really are sparse (or Monarch)."""
    n_linear = sum(type(m) is nn.Linear for m in original.modules())
    assert not any(type(m) is nn.Linear for m in sparse.modules())
    layers = {n: m for n, m in _sparse_layers(sparse).items() if not isinstance(m, ActivationSparseLinear)}
    if case in ACT_CASES:
        acts = [m for m in sparse.modules() if isinstance(m, ActivationSparseLinear)]
        assert len(acts) == n_linear
        return
    assert len(layers) == n_linear
    for name, m in layers.items():
        if isinstance(m, SparseLinear):
            assert 0.2 < m.sparsity < 1, f"{name}: sparsity {m.sparsity}"
        else:
            assert m.num_weights < m.in_features * m.out_features, f"{name}: Monarch as large as dense"


def _forward(model, ids, am, embeds=None):
    if embeds is None:
        return model(input_ids=ids, attention_mask=am).logits
    return model(inputs_embeds=embeds, attention_mask=am).logits


def _check_act_reference(twin):
    """Activation-sparse cases: every call of the sparse model had its twin, the sparsifier dropped
    inputs, and the inputs decided from the sparse layer's side were a handful."""
    for name, ref in twin.act_refs.items():
        assert not ref.seen, f"{name}: {len(ref.seen)} calls of the sparse layer had no twin"
        assert ref.kept and max(ref.kept) < 0.9, f"{name}: kept {ref.kept}: the sparsifier drops nothing"
        # topk counts a near-tied row whole: 2 of the 40 rows of an o_proj here
        assert max(ref.ambiguous) < 0.1, f"{name}: {max(ref.ambiguous):.1%} of the inputs on a threshold"


# ---- forward and backward ----

ALL_CASES = list(PATTERNS) + list(ACT_CASES)
# fp32 runs the C++ kernels; fp64 the reference ops, against the twin at fp64's tolerance (the
# activation-sparse reference ops are test_act.py's)
FWD_CASES = [pytest.param(c, torch.float32, id=f"{c}-fp32") for c in ALL_CASES] + [
    pytest.param(c, torch.float64, id=f"{c}-fp64") for c in PATTERNS]


@pytest.mark.parametrize("case,dtype", FWD_CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_sparsify_hf_model_forward_backward_match_dense_twin(arch, case, dtype):
    """Logits, the gradient of ``inputs_embeds`` and of every parameter, against the dense twin.

    4 x 10 tokens: 40 rows per linear, past the activation-sparse union GEMV (up to 32 rows).
    """
    sparse, twin = _models(arch, case, dtype)
    original = _original(arch)
    _check_swapped(original, sparse, case)
    ids, am = _batch(4, 10, seed=7)
    embeds = original.get_input_embeddings()(ids).detach()
    e_s = embeds.to(dtype).clone().requires_grad_()
    e_t = embeds.double().requires_grad_()
    y_s = _forward(sparse, ids, am, e_s)
    y_t = _forward(twin, ids, am, e_t)
    _check_act_reference(twin)
    assert y_s.dtype == dtype
    assert_close_rms(y_s, y_t, dtype, name="logits")
    # not vacuous: the sparse model computes something else than the model it came from
    with torch.no_grad():
        y_o = _forward(copy.deepcopy(original).double(), ids, am, embeds.double())
    assert (y_t - y_o).norm() > 1e-2 * y_o.norm(), "sparsifying changed nothing"

    g = torch.randn(y_t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (y_s * g.to(dtype)).sum().backward()
    (y_t * g).sum().backward()
    tol = TOL[dtype]
    assert_close_rms(e_s.grad, e_t.grad, dtype, name="d inputs_embeds")
    pairs = [(name, p, q, to_sparse) for name, p, q, to_sparse in _param_pairs(sparse, twin) if q.grad is not None]
    # a gradient that is 0 in exact arithmetic (BERT's key bias: softmax ignores a constant per row) is
    # rounding noise in both models; those are compared against the scale of all gradients instead
    scale = torch.cat([q.grad.flatten() for _, _, q, _ in pairs]).pow(2).mean().sqrt().item()
    for name, p, q, to_sparse in _param_pairs(sparse, twin):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{name}: gradient where the twin has none"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        expected = to_sparse(q.grad)
        if expected.pow(2).mean().sqrt() > 1e-6 * scale:
            assert_close_rms(p.grad, expected, dtype, name=f"d {name}")
        else:
            err = (p.grad.double() - expected).abs().max().item()
            assert err <= tol * scale, f"d {name}: the twin's gradient is ~0, this one is off by {err:.2e}"
    assert len(pairs) >= 15


# ---- generate ----


@pytest.mark.parametrize("case", ALL_CASES)
def test_sparsify_hf_decoder_generate_matches_dense_twin(case):
    """Greedy decoding of 5 tokens (a prefill, then 4 steps of 2 rows on the KV cache; one row left-padded)
    gives the twin's tokens, and the logits of every step agree first, by a margin the top two logits
    are apart: equal ids are not a coincidence of argmax."""
    # a left-padded row in fp64 makes HF's eager attention NaN (it adds finfo(fp64).min to the padded
    # keys and takes the softmax in fp32, where that is -inf: a fully masked row is 0/0), so the twin is fp32
    sparse, twin = _models("llama", case, twin_dtype=torch.float32)
    ids, am = _batch(2, 6, seed=11, left=True)
    kw = dict(attention_mask=am, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=PAD,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out_s = sparse.generate(ids, **kw)
        out_t = twin.generate(ids, **kw)
    _check_act_reference(twin)
    assert len(out_s.logits) == len(out_t.logits) == 5
    for step, (a, b) in enumerate(zip(out_s.logits, out_t.logits)):
        assert_close_rms(a, b, torch.float32, name=f"logits of step {step}")
        # the chosen token wins by more than the error: its id cannot flip
        top2 = b.topk(2, dim=-1).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-4 * b.abs().max()).all(), f"step {step}: a near tie"
    assert out_s.sequences.shape == (2, 11)
    assert torch.equal(out_s.sequences, out_t.sequences)
    # the decoder's own tokens differ between the two rows: not one constant token generated
    assert len(set(out_s.sequences[:, 6:].flatten().tolist())) > 1


# ---- training ----

TRAIN_STEPS = 4
LR = 1e-2
TRAIN_TOL = 1e-3


def _train(model, steps, ids, am, labels):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("case", list(PATTERNS))
@pytest.mark.parametrize("arch", ARCHS)
def test_sparsify_hf_model_adamw_keeps_masks_and_follows_dense_twin(arch, case):
    """A few AdamW steps on a language-model loss: each layer's mask is the same as before, weights
    off it stay exactly 0, the loss falls, and the trajectory (losses, every parameter) is that of
    AdamW on the twin's masked weights (a zero gradient off the mask leaves a zero weight at zero)."""
    sparse, twin = _models(arch, case)
    sparse.train()
    twin.train()
    ids, am = _batch(4, 8, seed=5)
    labels = torch.where(am.bool(), ids, -100)
    if arch == "bert":
        # masked-LM: predict some tokens only
        labels[:, ::2] = -100
    layers = {n: m for n, m in _sparse_layers(sparse).items() if isinstance(m, SparseLinear)}
    masks = {n: m.mask.clone() for n, m in layers.items()}
    start = {n: p.detach().clone() for n, p, _, _ in _param_pairs(sparse, twin)}

    losses = _train(sparse, TRAIN_STEPS, ids, am, labels)
    losses_t = _train(twin, TRAIN_STEPS, ids, am, labels)

    assert losses[-1] < 0.9 * losses[0], f"training did nothing: {losses}"
    for n, m in layers.items():
        assert torch.equal(m.mask, masks[n]), f"{n}: the mask changed"
        on_mask = m.format.to_dense(m.values.detach())
        assert (on_mask[~masks[n]] == 0).all(), f"{n}: a weight off the mask is nonzero"
        if isinstance(m.pattern, NM) and m.empty.numel():
            assert (m.values.detach().reshape(-1)[m.empty] == 0).all(), f"{n}: an empty N:M slot is nonzero"
        if isinstance(m.pattern, FanIn):
            assert (masks[n].sum(1) == m.pattern.k).all(), f"{n}: not {m.pattern.k} weights per row"
    assert losses == pytest.approx(losses_t, rel=1e-4), (losses, losses_t)
    for name, p, q, to_sparse in _param_pairs(sparse, twin):
        step, step_t = p.detach() - start[name], to_sparse(q.detach()) - start[name].double()
        if step_t.pow(2).mean().sqrt() > 1e-3 * LR:
            assert_close_rms(step, step_t, torch.float32, tol=TRAIN_TOL, name=f"{name}: AdamW's change")
        else:
            # a gradient that is 0 in exact arithmetic (BERT's key bias) is rounding noise, which Adam
            # scales up to as much as lr a step: such a parameter is only held to Adam's bound
            assert step.abs().max() <= LR * TRAIN_STEPS, f"{name}: moved more than AdamW can"


# ---- torch.compile ----


def _mixed_patterns(model, prefix, per_layer):
    """Give each linear under ``prefix`` the pattern ``per_layer`` names for the rest of its name."""
    for name, (pattern, sparsity) in per_layer.items():
        sparsify_(model, sparsity, pattern=pattern, filter_fn=lambda m, fqn, n=prefix + name: fqn == n)


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def _inductor_single_thread(_fresh_dynamo):
    import torch._inductor.config as inductor_config

    # NOTE: on the 2-core CI box the subprocess compile pool costs more start-up than these tiny graphs
    with inductor_config.patch(compile_threads=1):
        yield


def _mixed_llama_block():
    """Llama's first decoder layer with CSR, fan-in, Pixelfly, 2:4, transposable 2:8 and block-sparse
    projections, an input, and the keyword arguments ``LlamaModel`` passes (rotary embeddings, causal mask)."""
    model = copy.deepcopy(_original("llama"))
    _mixed_patterns(model, "model.layers.0.", {
        "self_attn.q_proj": ("unstructured", 0.5), "self_attn.k_proj": ("unstructured", 0.9),
        "self_attn.v_proj": (FanIn(16), None), "self_attn.o_proj": PATTERNS["pixelfly8x2b8-r4"],
        "mlp.gate_proj": ("2:4", None), "mlp.up_proj": (NM(2, 8, transposable=True), None),
        "mlp.down_proj": (Block(16), 0.5),
    })
    block = model.model.layers[0]
    assert not any(type(m) is nn.Linear for m in block.modules())
    x = torch.randn(2, 8, HIDDEN)
    pos = torch.arange(8).unsqueeze(0)
    pe = model.model.rotary_emb(x, position_ids=pos)
    causal = torch.full((8, 8), float("-inf")).triu(1).expand(2, 1, 8, 8)
    kw = dict(attention_mask=causal, position_ids=pos, position_embeddings=pe)
    return block, x, kw


def test_sparsified_llama_decoder_layer_compile_fullgraph_aot_eager(_fresh_dynamo):
    """One ``LlamaDecoderLayer`` whose seven projections are CSR, fan-in, Pixelfly, 2:4, transposable 2:8
    and block sparse, compiled whole (rotary ``position_embeddings`` and a causal mask passed in, as
    ``LlamaModel`` does): forward and backward (the input's and every parameter's gradient) as eager.

    aot_eager traces what inductor would be given (dynamo, the ops' fake kernels, AOT autograd's joint
    graph) without generating code: inductor's C++ compile of a whole block's backward costs more than
    the forward's on the 2-core box, so inductor compiles the block's forward
    (``test_sparsified_llama_decoder_layer_compile_fullgraph_inductor``) and the MLP's.
    """
    block, x, kw = _mixed_llama_block()
    _check_compiled_block(block, x, kw)


def _check_compiled_block(block, x, kw):
    """``torch.compile(fullgraph=True, backend="aot_eager")`` of ``block``: output, input gradient and
    every parameter's gradient as eager mode's."""
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    g = torch.randn(x.shape)
    results = []
    for mod in (block, compiled):
        xr = x.clone().requires_grad_()
        y = mod(xr, **kw)
        y.backward(g)
        results.append({"y": y.detach(), "dx": xr.grad,
                        **{f"d {n}": p.grad.clone() for n, p in block.named_parameters()}})
        block.zero_grad()
    assert len(results[0]) == 2 + len(list(block.parameters()))
    for name, eager in results[0].items():
        assert_close_rms(results[1][name], eager.double(), torch.float32, name=f"{name}: compiled vs eager")


def test_sparsified_bert_layer_compile_fullgraph_aot_eager(_fresh_dynamo):
    """One ``BertLayer`` with fan-in, Monarch, unstructured, activation-sparse (calibrated threshold),
    2:4 and block-sparse linears, compiled whole: forward and backward as eager mode."""
    model = copy.deepcopy(_original("bert"))
    _mixed_patterns(model, "bert.encoder.layer.0.", {
        "attention.self.query": (FanIn(16), None), "attention.self.key": (Monarch(4), None),
        "attention.self.value": ("unstructured", 0.9), "intermediate.dense": ("2:4", None),
        "output.dense": (Block(16), 0.5),
    })
    block = model.bert.encoder.layer[0]
    act = ActivationSparseLinear.from_dense(block.attention.output.dense, ACT_SPARSITY, "tensor")
    act.calibrate(torch.randn(64, HIDDEN))
    assert act.threshold > 0
    block.attention.output.dense = act
    assert not any(type(m) is nn.Linear for m in block.modules())
    # a padding mask on the last row's last two tokens, in the additive form BertModel passes down
    mask = torch.zeros(2, 1, 1, 8)
    mask[1, ..., 6:] = torch.finfo(torch.float32).min
    _check_compiled_block(block, torch.randn(2, 8, HIDDEN), dict(attention_mask=mask))


def test_sparsified_llama_mlp_compile_fullgraph_inductor(_inductor_single_thread):
    """The ``LlamaMLP`` of a sparsified decoder layer (2:4 gate, transposable 2:8 up, block-sparse down
    around SiLU and a product that inductor fuses), compiled by inductor: eager mode's output."""
    model = copy.deepcopy(_original("llama"))
    _mixed_patterns(model, "model.layers.0.mlp.", {
        "gate_proj": ("2:4", None), "up_proj": (NM(2, 8, transposable=True), None), "down_proj": (Block(16), 0.5),
    })
    mlp = model.model.layers[0].mlp
    assert not any(type(m) is nn.Linear for m in mlp.modules())
    x = torch.randn(2, 8, HIDDEN)
    with torch.no_grad():
        eager = mlp(x)
        compiled = torch.compile(mlp, fullgraph=True, backend="inductor")(x)
    assert_close_rms(compiled, eager.double(), torch.float32, name="compiled vs eager")


def test_sparsified_llama_decoder_layer_compile_fullgraph_inductor(_inductor_single_thread):
    """The whole mixed-pattern ``LlamaDecoderLayer`` (as in the aot_eager test) compiled by inductor, the
    default backend: eager mode's output. Forward only; the backward's graph is the aot_eager test's."""
    block, x, kw = _mixed_llama_block()
    with torch.no_grad():
        eager = block(x, **kw)
        compiled = torch.compile(block, fullgraph=True, backend="inductor")(x, **kw)
    eager = eager[0] if isinstance(eager, tuple) else eager
    compiled = compiled[0] if isinstance(compiled, tuple) else compiled
    assert_close_rms(compiled, eager.double(), torch.float32, name="compiled vs eager")
