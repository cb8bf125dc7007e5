"""Training (``python -m shvit train`` / ``shvit.train.train``) on tiny models: S1 widths, one block per stage,
64 px, a handful of synthetic classes, one CPU thread."""

import contextlib
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import shvit
from shvit import train as shvit_train
from shvit.data import SyntheticDataset, collate
from shvit_kernels import prefer_backend
from shvit_kernels import dispatch

from helpers import DEVICE, TINY_TRAIN_ARGS, parse_train_args, run_train, run_train_cli, tiny_model
from shvit_kernels.testing import assert_close_to_fp64

TINY = TINY_TRAIN_ARGS
PARITY_STEPS = 30


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machines running the suite are shared; one thread keeps these runs fast and their timing stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


parse, run, run_cli = parse_train_args, run_train, run_train_cli


def parity_run(tmp_path, backend):
    # No mixup so that the loss curve is a clean learning signal; the rest of the recipe (AGC, smoothing, EMA) stays on.
    return run(
        tmp_path, "--backend", backend, "--batch-size", "16", "--synthetic-size", "480", "16", "--epochs", "1",
        "--mixup", "0", "--cutmix", "0",
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    torch.manual_seed(0)
    return parity_run(tmp_path_factory.mktemp("ref"), "reference")


def test_reference_training_loss_decreases(reference_run):
    losses = reference_run["losses"]
    assert len(losses) == PARITY_STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not decrease over {PARITY_STEPS} steps: {first:.4f} -> {last:.4f}"
    val = reference_run["metrics"][-1]["val"]
    assert 0 <= val["top1"] <= val["top5"] <= 100 and val["images"] == 16


def test_reference_training_is_deterministic(reference_run, tmp_path):
    again = parity_run(tmp_path, "reference")
    assert again["losses"] == reference_run["losses"]
    for (name, a), b in zip(reference_run["model"].state_dict().items(), again["model"].state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between two identical reference runs"


FUSED = dispatch.usable_backends(DEVICE)
_NO_FUSED_REASON = f"no fused backend is usable on {DEVICE} here: " + "; ".join(
    f"{name}: {', '.join(dispatch.unavailable_reasons(name)) or 'no kernels registered'}"
    for name in dispatch.BACKENDS if name != "reference"
)


TRAINING_OPS = {"conv_bn_train", "conv_bn_train_backward", "shsa_train", "shsa_train_backward"}


def skip_without_training_kernels(backend):
    kernels = {op for op in dispatch.ops() if dispatch.kernel(backend, op) is not None}
    if backend != "reference" and not TRAINING_OPS & kernels:
        has = ", ".join(sorted(kernels))
        pytest.skip(f"backend '{backend}' has no training kernels (it has {has}): its training would be the reference's")


def lockstep_step(model, x, labels, backend, dtype):
    """Loss, gradients and BatchNorm statistics of one training step of a copy of ``model`` on ``backend``."""
    m = copy.deepcopy(model).to(dtype)
    with prefer_backend(backend):
        loss = F.cross_entropy(m(x.to(dtype)).float(), labels, label_smoothing=0.1)
        loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    stats = {n: b for n, b in m.named_buffers() if b.is_floating_point()}
    return m, loss.detach(), grads, stats


# Steps of PARITY_STEPS the lock-step comparison lets miss the rule: a conv rounded differently but as accurately can
# flip a ReLU mask by an ulp, and the gradients behind it then differ far more than rounding. The reference itself on
# ATen's other fp32 conv (oneDNN off) missed it in one step of 30 (6 tensors, 4 by over 64x); the cpp backend's own
# fp32 convs in one (AVX-512 and AVX2 builds: 1 tensor, 8x) or two (the plain build: 5 tensors, 8x; AMD Zen 5,
# 2026-12-04). A wrong kernel misses it at every step (test_lockstep_comparison_catches_a_wrong_kernel).
LOCKSTEP_MISSES = 3


def lockstep_misses(backend):
    """30 AdamW steps; at each one the backend and the reference start from the same weights and statistics, and
    each of the step's ~190 tensors is held to the project's rule (factor 4 for a whole network). Returns the steps
    that missed it (each a list of the messages), and the reference's losses."""
    torch.manual_seed(0)
    model = tiny_model().to(DEVICE)
    optimizer = torch.optim.AdamW(shvit_train.param_groups(model, 0.025), lr=2e-3)
    data = SyntheticDataset(PARITY_STEPS * 8, 4, 64, train=True)
    losses, missed_steps = [], []
    for step in range(PARITY_STEPS):
        images, labels, _ = collate([data[i] for i in range(step * 8, step * 8 + 8)])
        x, labels = shvit_train.to_device(images, DEVICE, True), labels.to(DEVICE)
        ref_model, ref_loss, ref_grads, ref_stats = lockstep_step(model, x, labels, "reference", torch.float32)
        _, loss, grads, stats = lockstep_step(model, x, labels, backend, torch.float32)
        if backend == "reference":  # determinism: a second reference run is bit-identical
            assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in grads), f"step {step}"
            assert all(torch.equal(stats[n], ref_stats[n]) for n in stats), f"step {step}"
        else:
            _, loss64, grads64, stats64 = lockstep_step(model, x, labels, "reference", torch.float64)
            # The project's rule per tensor (error vs fp64 at most k x the reference's own); k = 4, not 2, as a
            # whole network chains ~100 ops whose rounding adds up differently on each backend.
            missed = []
            for name, got, eager, exact in [("loss", loss, ref_loss, loss64)] + [
                (f"grad {n}", grads[n], ref_grads[n], grads64[n]) for n in grads
            ] + [(f"buffer {n}", stats[n], ref_stats[n], stats64[n]) for n in stats]:
                try:
                    assert_close_to_fp64(got, eager, exact, name=f"step {step} {name}", factor=4.0)
                except AssertionError as e:
                    missed.append(str(e))
            if missed:
                missed_steps.append(missed)
        losses.append(ref_loss.item())
        with torch.no_grad():  # continue from the reference's step
            for n, p in model.named_parameters():
                p.grad = ref_grads[n]
            for b, ref_b in zip(model.buffers(), ref_model.buffers()):
                b.copy_(ref_b)
        shvit_train.clip_gradients(list(model.parameters()), 0.02, "agc")
        optimizer.step()
    return missed_steps, losses


@pytest.mark.parametrize(
    "backend", ["reference"] + (FUSED or [pytest.param(None, marks=pytest.mark.skip(reason=_NO_FUSED_REASON))])
)
def test_backend_training_matches_reference(backend):
    """Free-running fp32 runs are no yardstick: AdamW amplifies rounding (two reference runs that differ only in
    memory format drift 1.7% apart in loss within 6 steps), so each step is compared from a common state and
    training then continues from the reference's result (lockstep_misses)."""
    skip_without_training_kernels(backend)
    missed_steps, losses = lockstep_misses(backend)
    assert len(missed_steps) <= LOCKSTEP_MISSES, (
        f"{len(missed_steps)} steps of {PARITY_STEPS} missed the rule:\n" + "\n".join(sum(missed_steps, [])))
    assert sum(losses[-5:]) < sum(losses[:5]), f"loss did not decrease: {losses}"


@contextlib.contextmanager
def leaky_conv_bn_backward():
    """A fused backend whose conv+BN backward leaks 0.1% of the neighbouring channel's input gradient into each
    channel's (an indexing bug), as the backend's name; skips the test where no backend has that kernel."""
    backend = next((b for b in FUSED if dispatch.kernel(b, "conv_bn_train_backward") is not None), None)
    if backend is None:
        pytest.skip("no usable fused backend has a conv_bn_train_backward kernel to break")
    real = dispatch.kernel(backend, "conv_bn_train_backward")

    def leaky(*args):
        grad_x, *rest = real(*args)
        return (grad_x + 1e-3 * grad_x.roll(1, dims=1), *rest)

    with dispatch.patched_backend(backend, kernels={"conv_bn_train_backward": leaky}):
        yield backend


def test_lockstep_comparison_catches_a_wrong_kernel():
    with leaky_conv_bn_backward() as backend:
        missed_steps, _ = lockstep_misses(backend)
    assert len(missed_steps) > LOCKSTEP_MISSES, f"a wrong kernel missed the rule in only {len(missed_steps)} steps"


# --------------------------------------------------------------------------------------------------------
# Free-running parity: whole runs of the training loop, compared only at the end
# --------------------------------------------------------------------------------------------------------
FREE_STEPS = 32
# lr 3e-5 held constant, no mixup/cutmix: at the recipe's lr a rounding-level change moves the loss curve by
# percents within a few steps; here by ~1e-4 over 32 steps while the loss still falls (1.41 -> 0.87). The
# recipe's AdamW and AGC stay; EMA is off (it does not feed back into training).
FREE_ARGS = (
    "--batch-size", "16", "--synthetic-size", str(FREE_STEPS * 16), "16", "--epochs", "1", "--lr", "3e-5",
    "--min-lr", "3e-5", "--mixup", "0", "--cutmix", "0", "--no-ema", "--device", DEVICE, "--amp", "none",
)
# Three benign perturbations of the reference spread its loss divergence over ~4x (4.6e-5 to 1.9e-4 here) and
# its parameter divergence over ~1.4x; a correct backend is one more such perturbation, so it must stay within
# 3x (loss) and 2x (parameters) of the largest of them.
LOSS_FACTOR, PARAM_FACTOR = 3.0, 2.0


def free_run(tmp_path, backend, *extra):
    result = run(tmp_path, "--backend", backend, *FREE_ARGS, *extra)
    return result["losses"], {n: p.detach().cpu().clone() for n, p in result["model"].named_parameters()}


def divergence(got, ref, init):
    """(max relative difference of the loss curves, |theta - theta_ref| / |theta_ref - theta_0| over all parameters).

    Parameters are compared as one vector, relative to how far training moved them: per tensor, a bias that a
    normalisation follows has no true gradient, so AdamW moves it by +-lr on rounding noise alone and even two
    reference runs differ in it by 100%.
    """
    (losses, params), (ref_losses, ref_params) = got, ref
    assert len(losses) == len(ref_losses) == FREE_STEPS
    loss_div = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    diff = sum(((params[n] - ref_params[n]) ** 2).sum() for n in ref_params).sqrt()
    moved = sum(((ref_params[n] - init[n]) ** 2).sum() for n in ref_params).sqrt()
    return loss_div, (diff / moved).item()


@pytest.fixture(scope="module")
def free_reference(tmp_path_factory):
    """The reference run, its initial parameters, and its largest divergence under three benign perturbations:
    NCHW instead of channels_last, and two random +-1 ulp changes of the initial weights (via --finetune)."""
    tmp = tmp_path_factory.mktemp("free")
    torch.manual_seed(0)  # the training loop's own initialisation (seed 0)
    model = tiny_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = free_run(tmp / "ref", "reference")
    perturbed = [free_run(tmp / "nchw", "reference", "--no-channels-last")]
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(init[n] * (1 + torch.finfo(torch.float32).eps * torch.randint(-1, 2, p.shape, generator=g)))
        shvit.save_checkpoint(model, tmp / f"ulp{seed}.pth")
        perturbed.append(free_run(tmp / f"ulp{seed}", "reference", "--finetune", str(tmp / f"ulp{seed}.pth")))
    divs = [divergence(p, ref, init) for p in perturbed]
    baseline = max(d[0] for d in divs), max(d[1] for d in divs)
    assert baseline[0] > 0 and baseline[1] > 0, "the perturbations changed nothing: no yardstick"
    return ref, init, baseline


def free_running_excess(tmp_path, backend, free_reference):
    """The backend's divergence from the reference as multiples of the allowed (loss, parameters) divergence."""
    ref, init, (loss_base, param_base) = free_reference
    loss_div, param_div = divergence(free_run(tmp_path, backend), ref, init)
    return loss_div / (LOSS_FACTOR * loss_base), param_div / (PARAM_FACTOR * param_base), (loss_div, param_div)


def test_reference_free_running_training_learns(free_reference):
    losses = free_reference[0][0]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), f"loss did not decrease: {losses}"


@pytest.mark.parametrize("backend", FUSED or [pytest.param(None, marks=pytest.mark.skip(reason=_NO_FUSED_REASON))])
def test_backend_free_running_training_matches_reference(backend, free_reference, tmp_path):
    """32 steps of the training loop on the backend, uninterrupted, against the reference run."""
    skip_without_training_kernels(backend)
    loss_x, param_x, (loss_div, param_div) = free_running_excess(tmp_path, backend, free_reference)
    base = free_reference[2]
    assert loss_x <= 1, f"loss curves differ by up to {loss_div:.2e} relative, > {LOSS_FACTOR}x the reference's own {base[0]:.2e}"
    assert param_x <= 1, f"final parameters differ by {param_div:.2e} relative, > {PARAM_FACTOR}x the reference's own {base[1]:.2e}"


def test_free_running_comparison_catches_a_wrong_kernel(free_reference, tmp_path):
    with leaky_conv_bn_backward() as backend:
        loss_x, param_x, _ = free_running_excess(tmp_path, backend, free_reference)
    assert loss_x > 1 and param_x > 1, f"a wrong kernel passed: {loss_x:.2f}x / {param_x:.2f}x of the allowed divergence"


def test_resume_is_exact(tmp_path):
    # 4 steps per epoch; the interrupted run stops in the middle of epoch 2 and resumes from its checkpoint.
    common = ("--batch-size", "8", "--synthetic-size", "32", "16", "--epochs", "2", "--ema-decay", "0.9")
    straight = run(tmp_path / "a", *common)
    first = run(tmp_path / "b", *common, "--steps", "6")
    assert len(first["losses"]) == 6
    resumed = run(tmp_path / "b", *common, "--resume", str(tmp_path / "b" / "checkpoint.pth"))
    assert resumed["losses"] == straight["losses"]
    for (name, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    s_state = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["train_state"]
    r_state = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["train_state"]
    for key in s_state["ema"]:
        assert torch.equal(s_state["ema"][key], r_state["ema"][key]), f"EMA {key} differs after resuming"
    for a, b in zip(s_state["optimizer"]["state"].values(), r_state["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert s_state["scheduler"] == r_state["scheduler"]


def test_checkpoints_load_with_shvit_and_in_the_authors_layout(tmp_path):
    result = run(tmp_path, "--batch-size", "8", "--synthetic-size", "16", "8", "--epochs", "1", "--save-authors")
    for path in (result["checkpoint"], tmp_path / "model_authors.pth"):
        model = tiny_model()
        shvit.load_checkpoint(model, path)
        for (name, a), b in zip(result["model"].state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name
    assert "model" in torch.load(tmp_path / "model_authors.pth", weights_only=True)


def test_finetune_resets_the_head_for_another_number_of_classes(tmp_path):
    source = tiny_model(num_classes=4)
    shvit.save_checkpoint(source, tmp_path / "pre.pth")
    # lr 0: the weights after one step are exactly what was loaded.
    result = run(
        tmp_path / "ft", "--finetune", str(tmp_path / "pre.pth"), "--num-classes", "3", "--batch-size", "8",
        "--synthetic-size", "16", "8", "--steps", "1", "--lr", "0", "--warmup-lr", "0", "--min-lr", "0", "--no-ema",
    )
    model = result["model"]
    assert model.num_classes == 3 and model.head.l.weight.shape == (3, source.num_features)
    loaded = dict(model.named_parameters())
    for name, p in source.named_parameters():
        if not name.startswith("head."):
            assert torch.equal(p, loaded[name]), f"{name} was not loaded from the fine-tuning checkpoint"


# --------------------------------------------------------------------------------------------------------
# System options: mixed precision, memory format, torch.compile
# --------------------------------------------------------------------------------------------------------
SHORT = ("--batch-size", "16", "--synthetic-size", "128", "16", "--epochs", "1", "--mixup", "0", "--cutmix", "0", "--no-ema")


@pytest.fixture(scope="module")
def short_fp32(tmp_path_factory):
    """8 steps in fp32, channels_last (the default)."""
    torch.manual_seed(0)
    return run(tmp_path_factory.mktemp("short"), *SHORT)


def assert_learns_and_reloads(result):
    losses = result["losses"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], f"loss did not decrease: {losses}"
    model = tiny_model()
    shvit.load_checkpoint(model, result["checkpoint"])
    for (name, a), b in zip(result["model"].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after loading the checkpoint"


def test_channels_last_is_the_default_and_optional(short_fp32, tmp_path):
    nchw = run(tmp_path, *SHORT, "--no-channels-last")
    for result, fmt in ((short_fp32, torch.channels_last), (nchw, torch.contiguous_format)):
        assert_learns_and_reloads(result)
        for name, p in result["model"].named_parameters():
            if p.ndim == 4 and p.shape[2:] != (1, 1):  # 1x1 kernels are both formats at once
                assert p.is_contiguous(memory_format=fmt), f"{name} is not in {fmt}"
    # Same weights and batch, only the kernels' summation order differs: the first loss agrees to fp32 rounding.
    assert nchw["losses"][0] == pytest.approx(short_fp32["losses"][0], rel=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_trains_and_its_checkpoint_loads(amp, short_fp32, tmp_path):
    result = run(tmp_path, *SHORT, "--amp", amp)
    assert_learns_and_reloads(result)
    # Autocast really ran (the first loss is not fp32's) but kept it to half-precision rounding (~1% here).
    first, fp32_first = result["losses"][0], short_fp32["losses"][0]
    assert first != fp32_first and first == pytest.approx(fp32_first, rel=0.1)
    scaler = torch.load(result["checkpoint"], weights_only=True)["train_state"]["scaler"]
    if amp == "fp16":  # GradScaler ran (it keeps a scale) and the scale is still usable
        assert math.isfinite(scaler["scale"]) and scaler["scale"] > 0
    else:
        assert scaler == {}, "bf16 needs no loss scaling"


def test_compile_trains_like_eager(short_fp32, tmp_path):
    # aot_eager: Dynamo and AOTAutograd trace the model with the custom ops (their fake and autograd
    # registrations) in a few seconds; inductor's C++ code generation would take ~30 s more on CPU.
    torch._dynamo.reset()
    result = run(tmp_path, *SHORT, "--compile", "aot_eager", "--steps", "3")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    eager = short_fp32["losses"][:3]
    # rel 1e-4: the traced graph runs the same ops (measured 4e-7); NCHW alone drifts 1.7e-4 by step 2 at this lr.
    assert result["losses"] == pytest.approx(eager, rel=1e-4), (result["losses"], eager)
    model = tiny_model()
    shvit.load_checkpoint(model, result["checkpoint"])  # the plain model is saved, not the compiled wrapper
    torch._dynamo.reset()


def random_gradients(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        # Per-tensor scales from 1e-4 to 10: some units get clipped, others not.
        p.grad = torch.randn(p.shape, generator=g) * 10 ** (torch.rand((), generator=g) * 5 - 4)


def test_agc_clips_each_unit_as_the_per_parameter_formula():
    model = tiny_model()
    random_gradients(model)
    params = list(model.parameters())
    original = [p.grad.clone() for p in params]
    expected = []
    with torch.no_grad():
        for p in params:  # the authors' formula, one parameter at a time
            max_norm = shvit_train._unitwise_norm(p).clamp(min=1e-3) * 0.02
            expected.append(p.grad * (max_norm / shvit_train._unitwise_norm(p.grad).clamp(min=1e-6)).clamp(max=1.0))
    changed = sum(not torch.equal(e, g) for e, g in zip(expected, original))
    assert 0 < changed < len(params), f"the test gradients should clip some parameters and not others ({changed})"
    assert any(p.ndim <= 1 for p in params) and any(p.ndim > 1 for p in params)
    shvit_train.clip_gradients(params, 0.02, "agc")
    differ = [n for (n, p), e in zip(model.named_parameters(), expected) if not torch.equal(p.grad, e)]
    assert not differ, f"{len(differ)} of {len(params)} gradients differ from the per-parameter formula: {differ[:5]}"


def test_training_optimizer_is_fused_adamw_with_the_plain_result():
    model = tiny_model()
    plain_model, initial = copy.deepcopy(model), copy.deepcopy(model)
    random_gradients(model, seed=1)
    random_gradients(plain_model, seed=1)
    groups = shvit_train.param_groups(model, 0.025)
    fused = shvit_train.build_optimizer(groups, 1e-3, torch.device("cpu"))
    assert fused.defaults["fused"], "AdamW on the CPU should run fused"
    plain = torch.optim.AdamW(shvit_train.param_groups(plain_model, 0.025), lr=1e-3, eps=1e-8)
    for _ in range(3):
        fused.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    moved = sum(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial.parameters()))
    assert moved == len(list(initial.parameters())), "every parameter should have taken steps"


def write_image_folder(root, classes, per_class=3, bad=0):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (72, 80, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    for i in range(bad):
        (root / "train" / classes[0] / f"broken{i}.jpg").write_bytes(b"not an image")


def test_image_folder_training_counts_unreadable_images(tmp_path):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path / "data", ["cat", "dog"], per_class=3, bad=2)
    with pytest.warns(UserWarning, match="unreadable image"):
        result = run(tmp_path / "out", "--data-dir", str(tmp_path / "data"), "--batch-size", "4", "--epochs", "1")
    record = result["metrics"][-1]
    assert record["train_skipped"] == 2
    assert record["val"]["images"] == 6 and record["val"]["top5"] == 100.0  # two classes: top-5 always hits
    assert result["model"].num_classes == 2


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    pytest.importorskip("PIL")
    assert run_cli(tmp_path, "--data-dir", str(tmp_path / "missing")) == 2
    assert "--data-dir" in capsys.readouterr().err

    write_image_folder(tmp_path / "data", ["a", "b"], per_class=1)
    os.makedirs(tmp_path / "data" / "train" / "empty")
    assert run_cli(tmp_path, "--data-dir", str(tmp_path / "data")) == 2
    err = capsys.readouterr().err
    assert "has no images" in err and "empty" in err

    other = shvit.create_model("shvit_s2", num_classes=4, depth=(1, 1, 1))
    shvit.save_checkpoint(other, tmp_path / "s2.pth")
    assert run_cli(tmp_path, "--finetune", str(tmp_path / "s2.pth")) == 2
    assert "shvit_s2" in capsys.readouterr().err
    assert run_cli(tmp_path, "--resume", str(tmp_path / "s2.pth")) == 2
    assert "not a training checkpoint" in capsys.readouterr().err

    for args, message in ((["--img-size", "70"], "--img-size"), (["--model", "shvit_s9"], "--model"),
                          (["--resume", str(tmp_path / "nothing.pth")], "--resume"),
                          (["--compile", "no_such_backend"], "unknown torch.compile backend"),
                          (["--keep-conv-outputs", "lots"], "--keep-conv-outputs must be all, none or a number")):
        assert run_cli(tmp_path, *args) == 2
        assert message in capsys.readouterr().err


def test_cli_subcommand_reports_errors_with_exit_status_2(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "shvit", "train", "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and "--data-dir: dataset folder not found" in res.stderr
