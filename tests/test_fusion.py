"""The MMSR fusion catalogue: shapes, gradients, padding, formulas recomputed from the weights, errors."""

import math

import pytest
import torch

from recbole_mm.layers.fusion import FUSIONS, TOKEN_FUSIONS, build_fusion, is_token_fusion

torch.set_num_threads(1)

D = 8
TEXT_LENS = [5, 3, 1, 4]  # real text tokens per row (T_text = 5): rows with different amounts of padding
T_IMAGE = 3
POOLED_KINDS = sorted(k for k in FUSIONS if k not in TOKEN_FUSIONS)
BASE_KINDS = ["sum", "concat", "film", "gated"]
DROPOUT_KINDS = ["sum_dnn", "concat_dnn", "film_dnn", "gated_dnn", "co_att", "merge_attn"]


def token_inputs(seed=0, image_lens=None):
    """``[(text tokens, text mask), (image tokens, image mask)]``; image mask all ones unless ``image_lens``."""
    g = torch.Generator().manual_seed(seed)
    n = len(TEXT_LENS)
    text = torch.randn(n, max(TEXT_LENS), D, generator=g)
    image = torch.randn(n, T_IMAGE, D, generator=g)
    text_mask = (torch.arange(max(TEXT_LENS))[None] < torch.tensor(TEXT_LENS)[:, None]).long()
    lens = torch.tensor(image_lens or [T_IMAGE] * n)
    image_mask = (torch.arange(T_IMAGE)[None] < lens[:, None]).long()
    return [(text, text_mask), (image, image_mask)]


def pooled_inputs(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)]


def inputs_for(kind, seed=0):
    return token_inputs(seed) if kind in TOKEN_FUSIONS else pooled_inputs(seed)


def make(kind, n_modalities=2, **kwargs):
    torch.manual_seed(0)
    return build_fusion(kind, D, n_modalities, **kwargs).eval()


def scramble(module, std=0.5):
    """Random values for every parameter (LayerNorm and biases included) so that formulas are really tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


# ------------------------------------------------------------------------------------------- independent references
def lin(x, layer):
    return x @ layer.weight.T + layer.bias


def ln(x, norm, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * norm.weight + norm.bias


def base_reference(kind, m, t, v):
    t, v = ln(t, m.layer_norm, 1e-6), ln(v, m.layer_norm, 1e-6)
    if kind.startswith("sum"):
        return lin(t, m.proj[0]) + lin(v, m.proj[1])
    if kind.startswith("concat"):
        return lin(torch.cat([t, v], -1), m.proj)
    if kind.startswith("film"):
        gb = lin(t, m.film)
        return lin(gb[:, :D] * v + gb[:, D:], m.out)
    if kind.startswith("gated"):
        return lin(torch.sigmoid(lin(t, m.gate)) * lin(v, m.value), m.out)
    raise AssertionError(kind)


def attn_reference(att, x, ctx, n_heads):
    """BERT attention sub-layer for one row: ``x [Tq, D]`` over ``ctx [Tk, D]`` (real tokens only)."""
    q, k, v = lin(x, att.query), lin(ctx, att.key), lin(ctx, att.value)
    dh = D // n_heads
    heads = []
    for h in range(n_heads):
        s = slice(h * dh, (h + 1) * dh)
        heads.append(torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(dh), -1) @ v[:, s])
    return ln(x + lin(torch.cat(heads, -1), att.dense), att.layer_norm, 1e-12)


def ffn_reference(ffn, x):
    gelu = 0.5 * lin(x, ffn.fc_in) * (1 + torch.erf(lin(x, ffn.fc_in) / math.sqrt(2)))
    return ln(x + lin(gelu, ffn.fc_out), ffn.layer_norm, 1e-12)


def merge_reference(m, pairs, n_heads):
    rows = []
    for i in range(pairs[0][0].shape[0]):
        x = torch.cat([tokens[i][mask[i] != 0] for tokens, mask in pairs], 0)
        for layer in m.layers:
            x = ffn_reference(layer.ffn, attn_reference(layer.attention, x, x, n_heads))
        rows.append(x.mean(0))
    return torch.stack(rows)


def co_att_reference(m, pairs, n_heads):
    (text, text_mask), (image, image_mask) = pairs
    rows = []
    for i in range(text.shape[0]):
        t = text[i][text_mask[i] != 0] + m.type_embedding.weight[0]
        v = image[i][image_mask[i] != 0] + m.type_embedding.weight[1]
        for b in m.blocks:
            t, v = attn_reference(b.cross, t, v, n_heads), attn_reference(b.cross, v, t, n_heads)
            t, v = attn_reference(b.text_self, t, t, n_heads), attn_reference(b.image_self, v, v, n_heads)
            t, v = ffn_reference(b.text_ffn, t), ffn_reference(b.image_ffn, v)
        rows.append(lin(torch.cat([t.mean(0), v.mean(0)]), m.out))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------- every kind
def test_catalogue():
    mmsr = {"sum", "concat", "film", "gated", "sum_dnn", "concat_dnn", "film_dnn", "gated_dnn", "co_att", "merge_attn"}
    assert set(FUSIONS) == mmsr | {"add"}
    assert TOKEN_FUSIONS == {"co_att", "merge_attn"}
    for kind, cls in FUSIONS.items():
        assert cls.token_level == is_token_fusion(kind) == (kind in TOKEN_FUSIONS)


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_shape_gradients_and_eval_determinism(kind):
    m = make(kind)
    inputs = inputs_for(kind)
    leaves = [x if isinstance(x, torch.Tensor) else x[0] for x in inputs]
    for leaf in leaves:
        leaf.requires_grad_(True)
    out = m(inputs)
    assert out.shape == (len(TEXT_LENS), D)
    (out * torch.randn_like(out)).sum().backward()  # random weights: a plain sum of LN outputs has zero gradient
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(m(inputs), m(inputs))


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_dropout_is_active_in_train_mode(kind):
    m = make(kind, dropout=0.5).train()
    inputs = inputs_for(kind)
    assert not torch.allclose(m(inputs), m(inputs))


@pytest.mark.parametrize("kind", sorted(FUSIONS))
@pytest.mark.parametrize("fill", ["random", "nan"])
def test_padding_cannot_change_the_output(kind, fill):
    m = make(kind)
    for pairs in (token_inputs(), token_inputs(image_lens=[3, 2, 1, 3])):
        out = m(pairs)
        assert torch.isfinite(out).all()
        changed = []
        for tokens, mask in pairs:
            pad = (mask == 0).unsqueeze(-1).expand_as(tokens)
            junk = torch.randn_like(tokens) * 100 if fill == "random" else torch.full_like(tokens, float("nan"))
            changed.append((torch.where(pad, junk, tokens), mask))
        assert torch.allclose(m(changed), out, atol=1e-6)
        # each row equals the same row given alone with its real tokens only (any amount of padding)
        for i in range(len(TEXT_LENS)):
            alone = [(t[i:i + 1][:, mk[i] != 0], torch.ones(1, int((mk[i] != 0).sum()))) for t, mk in pairs]
            assert torch.allclose(m(alone)[0], out[i], atol=1e-5)


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_a_row_without_text_tokens_gives_no_nan(kind):
    (text, text_mask), image = token_inputs()
    text_mask = text_mask.clone()
    text_mask[1] = 0
    assert torch.isfinite(make(kind)([(text, text_mask), image])).all()


# ------------------------------------------------------------------------------------------- pooled fusions
@pytest.mark.parametrize("kind", POOLED_KINDS)
def test_pooled_kinds_pool_pairs_by_masked_mean(kind):
    m = make(kind)
    (text, text_mask), (image, image_mask) = token_inputs()
    t_bar = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
    v_bar = image.mean(1)  # all-ones image mask: the plain mean, as MMSR pools image tokens
    assert torch.allclose(m([(text, text_mask), (image, image_mask)]), m([t_bar, v_bar]), atol=1e-6)
    assert torch.allclose(m([(text, text_mask), v_bar]), m([t_bar, v_bar]), atol=1e-6)  # mixed entries


@pytest.mark.parametrize("kind", BASE_KINDS + [k + "_dnn" for k in BASE_KINDS])
def test_pooled_formulas_from_the_weights(kind):
    m = scramble(make(kind, dnn_layers=2))
    t, v = pooled_inputs()
    expected = base_reference(kind, m, t, v)
    linears = [layer for layer in m.dnn if isinstance(layer, torch.nn.Linear)]
    assert len(linears) == (2 if kind.endswith("_dnn") else 0)
    assert sum(isinstance(layer, torch.nn.Dropout) for layer in m.dnn) == len(linears)
    for layer in linears:
        expected = torch.relu(lin(expected, layer))
    assert torch.allclose(m([t, v]), expected, atol=1e-5)


def test_dnn_default_depth_is_mmsr_three():
    m = build_fusion("sum_dnn", D, 2)
    assert sum(isinstance(layer, torch.nn.Linear) for layer in m.dnn) == 3


def test_add_is_a_parameter_free_sum():
    m = make("add")
    t, v = pooled_inputs()
    assert not list(m.parameters())
    assert torch.equal(m([t, v]), t + v)


@pytest.mark.parametrize("kind", ["add", "sum", "concat", "sum_dnn", "concat_dnn", "merge_attn"])
def test_sum_concat_and_merge_take_any_number_of_modalities(kind):
    m = make(kind, n_modalities=3)
    inputs = token_inputs() + [token_inputs(1)[0]] if kind in TOKEN_FUSIONS else pooled_inputs() + pooled_inputs(1)[:1]
    assert m(inputs).shape == (len(TEXT_LENS), D)
    assert make(kind, n_modalities=1)(inputs[:1]).shape == (len(TEXT_LENS), D)


def test_init_xavier_for_pooled_and_bert_for_attention():
    torch.manual_seed(0)
    m = build_fusion("concat_dnn", 32, 2)
    for layer in [m.proj] + [x for x in m.dnn if isinstance(x, torch.nn.Linear)]:
        fan_out, fan_in = layer.weight.shape
        assert abs(layer.weight.std().item() / math.sqrt(2 / (fan_in + fan_out)) - 1) < 0.25
        assert torch.all(layer.bias == 0)
    assert torch.all(m.layer_norm.weight == 1) and m.layer_norm.eps == 1e-6
    for kind in TOKEN_FUSIONS:
        m = build_fusion(kind, 32, 2)
        for module in m.modules():
            if isinstance(module, torch.nn.Linear):
                assert abs(module.weight.std().item() / 0.02 - 1) < 0.25 and torch.all(module.bias == 0)
            if isinstance(module, torch.nn.LayerNorm):
                assert module.eps == 1e-12 and torch.all(module.weight == 1)


# ------------------------------------------------------------------------------------------- token-level fusions
@pytest.mark.parametrize("n_heads, n_layers", [(1, 1), (2, 2)])
def test_merge_attn_from_the_weights(n_heads, n_layers):
    m = scramble(make("merge_attn", n_heads=n_heads, n_layers=n_layers), std=0.3)
    assert not hasattr(m, "type_embedding")  # computed but never added in the original: left out
    for pairs in (token_inputs(), token_inputs(image_lens=[3, 1, 2, 3])):
        assert torch.allclose(m(pairs), merge_reference(m, pairs, n_heads), atol=1e-5)


@pytest.mark.parametrize("n_heads, n_layers", [(1, 1), (2, 2)])
def test_co_att_from_the_weights(n_heads, n_layers):
    m = scramble(make("co_att", n_heads=n_heads, n_layers=n_layers), std=0.3)
    pairs = token_inputs()
    assert torch.allclose(m(pairs), co_att_reference(m, pairs, n_heads), atol=1e-5)


def test_merge_attn_mixes_modalities():
    m = scramble(make("merge_attn"), std=0.3)
    (text, text_mask), (image, image_mask) = token_inputs()
    base = m([(text, text_mask), (image, image_mask)])
    moved = m([(text, text_mask), (image + torch.randn_like(image), image_mask)])
    assert not torch.allclose(base, moved, atol=1e-4)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", sorted(TOKEN_FUSIONS))
def test_token_fusion_rejects_pooled_inputs(kind):
    m = make(kind)
    pairs = token_inputs()
    with pytest.raises(ValueError, match="token-level fusion.*needs token inputs"):
        m([pairs[0], pairs[1][0].mean(1)])


@pytest.mark.parametrize("kind", ["film", "gated", "film_dnn", "gated_dnn", "co_att"])
def test_two_modality_kinds_reject_three(kind):
    with pytest.raises(ValueError, match=kind):
        build_fusion(kind, D, 3)


def test_unknown_kind_lists_the_choices():
    with pytest.raises(ValueError, match="unknown fusion 'avg'") as err:
        build_fusion("avg", D, 2)
    for kind in FUSIONS:
        assert repr(kind) in str(err.value)
    with pytest.raises(ValueError, match="choose from"):
        is_token_fusion("avg")


def test_wrong_number_of_inputs():
    with pytest.raises(ValueError, match="built for 2 modalities"):
        make("sum")(pooled_inputs()[:1])
    with pytest.raises(ValueError, match="built for 2 modalities"):
        make("merge_attn")(token_inputs()[:1])
