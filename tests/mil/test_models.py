"""The MIL student contract, checked for every model in list_models()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import BagError, ConfigError
from mil.models import (
    BagShapeError,
    MILModel,
    MILOutput,
    NystromAttention,
    ParamCount,
    count_parameters,
    create_model,
    fuse_heads_by_vote,
    list_models,
    model_info,
    register_model,
    smooth_top1_svm_loss,
)
from mil.models._base import bag_classification_loss

MODELS = list_models()
PADDING_MODELS = [m for m in MODELS if model_info(m).model_cls.supports_padding]
NO_PADDING_MODELS = [m for m in MODELS if not model_info(m).model_cls.supports_padding]
#: Compute-only settings that keep TransMIL fast on CPU (parameter shapes are unchanged).
FAST = {"transmil": {"num_landmarks": 16}}
#: Models whose logits are classifier(bag_feature) exactly.
LINEAR_HEAD = {"abmil", "transmil", "dsmil", "clam_sb", "meanpool", "dtfd"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread on a shared 2-core box


def build(name: str, in_dim: int = 32, n_classes: int = 2, seed: int = 0, **kw) -> MILModel:
    torch.manual_seed(seed)
    return create_model(name, in_dim, n_classes, **{**FAST.get(name, {}), **kw})


def bag_feature_dim(name: str, n_classes: int, embed_dim: int = 512) -> int:
    return n_classes * embed_dim if name in ("dsmil", "clam_mb") else embed_dim


# ------------------------------------------------------------------------------ registry


def test_registry_lists_every_student():
    assert set(MODELS) == {
        "abmil", "transmil", "transmil_mhim", "dsmil", "clam_sb", "clam_mb", "dtfd", "meanpool", "maxpool"
    }


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [("abmil", {}, 657_026), ("abmil", {"gated": False}, 591_490), ("transmil", {}, 2_672_146)],
)
def test_paper_parameter_counts(name, kwargs, expected):
    assert count_parameters(create_model(name, 1024, 2, **kwargs)) == expected


@pytest.mark.parametrize(
    "name, ref",
    [(n, ref) for n in MODELS for ref in model_info(n).param_counts],
    ids=lambda v: v if isinstance(v, str) else str(v.count),
)
def test_recorded_parameter_counts(name, ref: ParamCount):
    assert count_parameters(create_model(name, 1024, 2, **ref.kwargs)) == ref.count


def test_every_model_records_a_parameter_count():
    assert all(model_info(n).param_counts for n in MODELS)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="Unknown MIL model 'abmill'. Valid models: abmil, "):
        create_model("abmill", 1024, 2)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "1024", None])
@pytest.mark.parametrize("param", ["in_dim", "n_classes"])
def test_bad_dims_give_parameter_messages(param, bad):
    args = {"in_dim": 1024, "n_classes": 2, param: bad}
    with pytest.raises(ConfigError) as err:
        create_model("abmil", args["in_dim"], args["n_classes"])
    assert str(err.value) == (
        f"The {param!r} parameter of create_model must be an int >= 1. Got {bad!r} instead."
    )


def test_none_kwargs_are_dropped_and_unknown_ones_rejected():
    assert create_model("abmil", 64, 2, gated=None, dropout=None).gated is True
    unknown = r"does not take the parameter\(s\) 'gatd'. Accepted: gated, embed_dim"
    with pytest.raises(ConfigError, match=unknown):
        create_model("abmil", 64, 2, gatd=False)
    with pytest.raises(ConfigError, match="'multi_branch'"):
        create_model("clam_sb", 64, 2, multi_branch=True)


def test_bad_option_values_give_parameter_messages():
    with pytest.raises(ConfigError, match="The 'dropout' parameter of ABMIL must be a float"):
        create_model("abmil", 64, 2, dropout=1.5)
    with pytest.raises(ConfigError, match="The 'task' parameter of DSMIL must be one of"):
        create_model("dsmil", 64, 2, task="regression")
    with pytest.raises(ConfigError, match="must be divisible by 'heads'"):
        create_model("transmil", 64, 2, embed_dim=100, heads=8)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'abmil' is already registered"):

        @register_model(model_cls=MILModel)
        def abmil(in_dim, n_classes, **kw):  # noqa: F811 - the point of the test
            raise AssertionError


# ------------------------------------------------------------------------------ contract


@pytest.mark.parametrize(
    "in_dim, n_classes",
    [(1024, 2), (1024, 3), (1024, 4), (512, 2), (512, 3), (512, 4), (768, 2), (1536, 2), (512, 1)],
)
@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name, in_dim, n_classes):
    model = build(name, in_dim, n_classes).eval()
    x = torch.randn(2, 23, in_dim)
    with torch.no_grad():
        h = model.embed(x)
        out = model(x)
        prob = model.instance_class_prob(h)
    assert isinstance(out, MILOutput)
    assert h.shape == (2, 23, model.embed_dim)
    assert out.logits.shape == (2, n_classes)
    assert out.bag_feature.shape == (2, bag_feature_dim(name, n_classes))
    assert out.instance_scores.shape == (2, 23)
    assert prob.shape == (2, 23)
    for t in (out.logits, out.bag_feature, out.instance_scores, prob):
        assert torch.isfinite(t).all()
    if name != "dsmil":  # DSMIL's class-aware score is a logit (official v2), not a probability
        floor = 0.5 if n_classes == 1 else 1.0 / n_classes  # max of a distribution over classes
        assert ((prob >= floor - 1e-6) & (prob <= 1 + 1e-6)).all()
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == n_classes
    if name in LINEAR_HEAD:
        torch.testing.assert_close(model.classifier(out.bag_feature), out.logits)


def test_transmil_reference_configuration_runs_past_one_landmark_group():
    # 300 instances -> 1 + 18*18 = 325 tokens -> padded to 512 = 2 tokens per landmark
    model = create_model("transmil", 1024, 2).eval()
    with torch.no_grad():
        out = model(torch.randn(300, 1024))
    assert out.logits.shape == (1, 2) and out.extras["head_attention"].shape == (1, 8, 300)
    torch.testing.assert_close(out.extras["head_attention"].sum(-1), torch.ones(1, 8))


@pytest.mark.parametrize("name", MODELS)
def test_two_d_input_is_one_bag(name):
    model = build(name).eval()
    x = torch.randn(17, 32)
    with torch.no_grad():
        a, b = model(x), model(x.unsqueeze(0))
    torch.testing.assert_close(a.logits, b.logits)
    assert a.logits.shape == (1, 2)


@pytest.mark.parametrize("name", MODELS)
def test_batch_equals_single_bags(name):
    model = build(name).eval()
    x = torch.randn(3, 29, 32)
    with torch.no_grad():
        batch = model(x)
        singles = [model(x[i]) for i in range(3)]
    torch.testing.assert_close(batch.logits, torch.cat([s.logits for s in singles]))
    torch.testing.assert_close(batch.bag_feature, torch.cat([s.bag_feature for s in singles]))
    torch.testing.assert_close(
        batch.instance_scores, torch.cat([s.instance_scores for s in singles])
    )


def _padded(lengths, dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, dim, generator=g) for n in lengths]
    x = torch.randn(len(bags), max(lengths), dim, generator=g) * 50  # junk in the padding
    mask = torch.zeros(len(bags), max(lengths), dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return bags, x, mask


@pytest.mark.parametrize("name", PADDING_MODELS)
def test_padded_batch_equals_unpadded_bags(name):
    model = build(name).eval()
    bags, x, mask = _padded([31, 12, 45])
    target = torch.tensor([1, 0, 1])
    with torch.no_grad():
        out = model(x, mask)
        prob = model.instance_class_prob(model.embed(x), mask)
        aux = model.auxiliary_loss(out, target)
        for i, bag in enumerate(bags):
            n = len(bag)
            single = model(bag)
            torch.testing.assert_close(out.logits[i : i + 1], single.logits)
            torch.testing.assert_close(out.bag_feature[i : i + 1], single.bag_feature)
            torch.testing.assert_close(out.instance_scores[i, :n], single.instance_scores[0])
            assert torch.isneginf(out.instance_scores[i, n:]).all()
            torch.testing.assert_close(prob[i, :n], model.instance_class_prob(model.embed(bag))[0])
            assert (prob[i, n:] == 0).all()
        if aux is not None:
            singles = [
                model.auxiliary_loss(model(b), target[i : i + 1]) for i, b in enumerate(bags)
            ]
            torch.testing.assert_close(aux, torch.stack(singles).mean())


@pytest.mark.parametrize("name", NO_PADDING_MODELS)
def test_padding_is_refused_where_unsupported(name):
    model = build(name).eval()
    _, x, mask = _padded([20, 9])
    with pytest.raises(BagShapeError, match="does not support padded batches"):
        model(x, mask)
    model(x, torch.ones_like(mask))  # an all-True mask is no padding


@pytest.mark.parametrize("name", MODELS)
def test_empty_bag_raises(name):
    model = build(name)
    with pytest.raises(BagShapeError, match="empty bag"):
        model(torch.empty(0, 32))
    with pytest.raises(BagShapeError, match="empty bag"):
        model.aggregate(torch.empty(1, 0, model.embed_dim))
    _, x, mask = _padded([5, 3])
    mask[1] = False
    with pytest.raises(BagShapeError, match="no real instance"):
        model(x, mask)


def test_bag_errors_are_in_the_family():
    assert issubclass(BagShapeError, BagError) and issubclass(BagShapeError, ValueError)


@pytest.mark.parametrize("name", MODELS)
def test_wrong_feature_size_says_what_to_do(name):
    model = build(name)
    with pytest.raises(BagShapeError, match="built for 32-d instance features but got 64-d"):
        model(torch.randn(5, 64))
    with pytest.raises(BagShapeError, match=r"shaped \[B, N, D\]"):
        model(torch.randn(2, 3, 5, 32))


@pytest.mark.parametrize("name", MODELS)
def test_half_precision_bags_are_accepted(name):
    model = build(name).eval()
    x = torch.randn(11, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x.half()).logits, model(x.half().float()).logits)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_under_manual_seed(name):
    x = torch.randn(1, 40, 32)
    y = torch.tensor([1])
    runs = []
    for _ in range(2):
        model = build(name, seed=3).train()  # dropout and DTFD's random split use the seed
        torch.manual_seed(7)
        out = model(x)
        loss = model.training_loss(out, y, bag_classification_loss(out.logits, y))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs.append((out.logits.detach(), out.instance_scores.detach(), loss.detach(), grads))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------ MHIM scores


def test_abmil_instance_class_prob_is_the_direct_formula():
    model = build("abmil", n_classes=3).eval()
    h = model.embed(torch.randn(1, 25, 32))
    with torch.no_grad():
        a = torch.softmax(model.attention(h)[0, :, 0], dim=0)  # [N]
        W = model.classifier.weight
        expected = torch.stack([torch.softmax(W @ (a[i] * h[0, i]), 0).max() for i in range(25)])
        torch.testing.assert_close(model.instance_class_prob(h)[0], expected)
        # instance_scores are the attention logits before the softmax
        logits = model.attention(h)[0, :, 0]
        torch.testing.assert_close(model.aggregate(h).instance_scores[0], logits)


def test_dsmil_instance_class_prob_is_the_max_class_instance_logit():
    model = build("dsmil", n_classes=3).eval()
    h = model.embed(torch.randn(1, 25, 32))
    with torch.no_grad():
        ins = model.instance_classifier(h)[0]
        torch.testing.assert_close(model.instance_class_prob(h)[0], ins.amax(-1))  # official v2
        out = model.aggregate(h)
        torch.testing.assert_close(out.instance_scores[0], ins.amax(-1))
        torch.testing.assert_close(out.extras["max_instance_logits"][0], ins.amax(0))


def test_transmil_class_token_scores_are_the_direct_formula():
    model = build("transmil").eval()
    h = model.embed(torch.randn(1, 20, 32))
    with torch.no_grad():
        out = model.aggregate(h)
        tokens = model.layer1.norm(torch.cat([model.cls_token, h], dim=1))[0]
        attn = model.layer1.attn
        qkv = tokens @ attn.to_qkv.weight.t()
        q, k, v = (t.view(21, attn.heads, attn.dim_head).transpose(0, 1) for t in qkv.chunk(3, -1))
        a = torch.softmax(q[:, :1] @ k[:, 1:].transpose(1, 2) / math.sqrt(attn.dim_head), -1)[:, 0]
        torch.testing.assert_close(out.extras["head_attention"][0], a)
        weighted = (a.unsqueeze(-1) * v[:, 1:]).transpose(0, 1).reshape(20, -1)
        logits = attn.to_out[0](weighted) @ model.classifier.weight.t()
        torch.testing.assert_close(model.instance_class_prob(h)[0], logits.softmax(-1).amax(-1))
        # fused scores: an instance at the top of every head gets 1
        top = a.argmax(-1)
        if (top == top[0]).all():
            assert out.instance_scores[0, top[0]] == 1.0


def test_vote_fusion_picks_instances_most_heads_agree_on():
    # instance 0 is huge in one head only; instance 1 tops the other two heads
    scores = torch.tensor([[[100.0, 2.0, 0.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0]]])
    assert fuse_heads_by_vote(scores, 1)[0].tolist() == [1]
    assert scores.mean(1).argmax().item() == 0  # what averaging heads would pick instead
    assert fuse_heads_by_vote(scores, 1, largest=False)[0].tolist() == [0]
    assert sorted(fuse_heads_by_vote(scores, 2)[0].tolist()) == [1, 2]  # votes 1, 3, 2


# ------------------------------------------------------------------------------ Nystrom


def test_nystrom_is_exact_when_every_token_is_a_landmark():
    torch.manual_seed(0)
    attn = NystromAttention(
        32, heads=2, dim_head=16, num_landmarks=16, pinv_iterations=25, residual_kernel=None
    ).eval()
    x = torch.randn(1, 10, 32)  # padded in front to 16 zero tokens: 1 token per landmark
    xp = F.pad(x, (0, 0, 6, 0))
    q, k, v = attn.qkv(xp)
    full = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(1, 16, 32)
    torch.testing.assert_close(attn(x), attn.to_out(full)[:, -10:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 100])
def test_nystrom_handles_any_length(n):
    attn = NystromAttention(32, heads=2, dim_head=16, num_landmarks=16).eval()
    out = attn(torch.randn(2, n, 32))
    assert out.shape == (2, n, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17])
def test_transmil_small_bags(n):
    model = build("transmil").eval()
    with torch.no_grad():
        out = model(torch.randn(n, 32))
    assert out.logits.shape == (1, 2) and out.instance_scores.shape == (1, n)
    assert torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------------ losses


def test_training_loss_hook_semantics():
    x, y = torch.randn(1, 30, 32), torch.tensor([1])
    for name in MODELS:
        model = build(name).train()
        torch.manual_seed(0)
        out = model(x)
        task_loss = bag_classification_loss(out.logits, y)
        total = model.training_loss(out, y, task_loss)
        assert total.dim() == 0 and total.requires_grad
        aux = model.auxiliary_loss(out, y)
        if name == "dsmil":
            expected = 0.5 * task_loss + 0.5 * F.cross_entropy(out.extras["max_instance_logits"], y)
            torch.testing.assert_close(total, expected)
        elif name in ("clam_sb", "clam_mb"):
            torch.testing.assert_close(total, 0.7 * task_loss + aux)
        elif name == "dtfd":
            sub = out.extras["pseudo_bag_logits"][0]
            expected = task_loss + F.cross_entropy(sub, y.repeat(len(sub)))
            torch.testing.assert_close(total, expected)
        else:
            assert aux is None and total is task_loss
        survival = build(name, n_classes=4, task="survival")
        sout = survival(x)
        nll = sout.logits.sum()  # stand-in for the survival loss
        assert survival.training_loss(sout, torch.tensor([[2, 0]]), nll) is nll


def test_clam_instance_loss_follows_clam():
    model = build("clam_sb", k_sample=3).eval()
    h = model.embed(torch.randn(1, 20, 32))
    out = model.aggregate(h)
    a = out.extras["attention_logits"][0, 0]
    top, bottom = a.topk(3).indices, (-a).topk(3).indices
    inst = model.instance_classifiers[1](h[0, torch.cat([top, bottom])])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    torch.testing.assert_close(
        model.auxiliary_loss(out, torch.tensor([1])), 0.3 * smooth_top1_svm_loss(inst, labels)
    )
    # bags smaller than k_sample are fine (CLAM itself fails there)
    assert torch.isfinite(model.auxiliary_loss(model(torch.randn(2, 32)), torch.tensor([0])))


def test_smooth_top1_svm_matches_its_definition():
    s = torch.tensor([[2.0, 0.5], [0.1, 0.3]])
    y = torch.tensor([0, 0])
    # tau * logsumexp_j((s_j + [j != y] - s_y) / tau) with tau = 1, per row, then the mean
    rows = [torch.tensor([0.0, 0.5 + 1 - 2.0]), torch.tensor([0.0, 0.3 + 1 - 0.1])]
    manual = torch.stack([torch.logsumexp(r, 0) for r in rows]).mean()
    torch.testing.assert_close(smooth_top1_svm_loss(s, y), manual)
    # tau -> 0 gives the hard multi-class hinge max_j(s_j + [j != y]) - s_y
    hard = torch.tensor([max(2.0, 0.5 + 1) - 2.0, max(0.1, 0.3 + 1) - 0.1]).mean()
    torch.testing.assert_close(smooth_top1_svm_loss(s, y, tau=1e-3), hard, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------ learning


def _synthetic_bags(n_bags=40, dim=32, seed=0):
    """Bags of 50-200 Gaussian instances; positives hide 1-3 witnesses shifted along one axis."""
    g = torch.Generator().manual_seed(seed)
    direction = F.normalize(torch.randn(dim, generator=g), dim=0)
    bags, labels = [], []
    for i in range(n_bags):
        n = int(torch.randint(50, 201, (1,), generator=g))
        x = torch.randn(n, dim, generator=g)
        label = i % 2
        if label:
            k = int(torch.randint(1, 4, (1,), generator=g))
            idx = torch.randperm(n, generator=g)[:k]
            x[idx] += 4.0 * direction
        bags.append(x)
        labels.append(label)
    return bags, torch.tensor(labels)


#: Small transformers for the CPU (the learning, not the paper's sizes, is what is tested here).
LEARN_KW = {name: {"embed_dim": 64, "heads": 4, "num_landmarks": 32} for name in ("transmil", "transmil_mhim")}


@pytest.mark.parametrize("name", MODELS)
def test_learns_a_synthetic_mil_task(name):
    from sklearn.metrics import roc_auc_score

    bags, labels = _synthetic_bags()
    model = build(name, **LEARN_KW.get(name, {}))
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    order = torch.Generator().manual_seed(1)

    def train_auc() -> float:
        model.eval()
        with torch.no_grad():
            scores = [model(b).logits.softmax(-1)[0, 1].item() for b in bags]
        model.train()
        return roc_auc_score(labels.numpy(), scores)

    auc = 0.0
    for epoch in range(30):
        for i in torch.randperm(len(bags), generator=order).tolist():
            out = model(bags[i])
            y = labels[i : i + 1]
            loss = model.training_loss(out, y, F.cross_entropy(out.logits, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 3 == 2:
            auc = train_auc()
            if auc > 0.95:
                break
    assert auc > 0.9, f"{name}: train AUC {auc:.3f} after {epoch + 1} epochs"


@pytest.mark.parametrize("name", MODELS)
def test_gelu_embedding_option(name):
    """``act: gelu`` (MHIM-v2 configs) swaps the embedding's ReLU for GELU, same parameters."""
    relu, gelu = build(name, 32, 2), build(name, 32, 2, act="gelu")
    assert count_parameters(relu) == count_parameters(gelu)
    assert any(isinstance(m, nn.GELU) for m in gelu.feature) and not any(isinstance(m, nn.ReLU) for m in gelu.feature)
    assert any(isinstance(m, nn.ReLU) for m in relu.feature)
    with pytest.raises(ConfigError, match="'act'"):
        build(name, 32, 2, act="swish")
