"""Distillation as in the authors' recipe (DeiT hard distillation through the distillation head)."""

import pytest
import torch
import torch.nn.functional as F

import shvit
from shvit import train as shvit_train
from shvit.__main__ import main as cli_main
from shvit.distill import Distiller, distillation_loss, split_outputs
from helpers import parse_train_args as parse, require_timm

DISTILL_RUN = ["--steps", "3", "--epochs", "1", "--synthetic-size", "48", "16", "--batch-size", "8", "--no-ema"]


def test_hard_and_soft_losses_follow_deit():
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.allclose(distillation_loss(student, teacher, "hard"), F.cross_entropy(student, teacher.argmax(1)))
    tau = 2.0
    p_t = F.softmax(teacher / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / tau, 1))).sum() * tau * tau / student.numel()
    assert torch.allclose(distillation_loss(student, teacher, "soft", tau), kl)
    with pytest.raises(ValueError, match="hard"):
        distillation_loss(student, teacher, "none")


def test_distiller_mixes_base_and_teacher_terms():
    teacher = torch.nn.Linear(3, 5)
    x, dist, base = torch.randn(4, 3), torch.randn(4, 5), torch.tensor(2.0)
    loss = Distiller(teacher, "hard", alpha=0.25, tau=1.0)(base, dist, x)
    expected = 0.75 * base + 0.25 * F.cross_entropy(dist, teacher(x).argmax(1))
    assert torch.allclose(loss, expected)
    with pytest.raises(RuntimeError, match="distillation head"):
        Distiller(teacher, "hard", 0.5, 1.0)(base, None, x)
    logits, logits_dist = split_outputs((torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3)))
    assert logits.dtype == logits_dist.dtype == torch.float32


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    shvit.save_checkpoint(shvit.create_model("shvit_s1", num_classes=4), path)
    return str(path)


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_training_routes_the_teacher_to_the_distillation_head(tmp_path, teacher_checkpoint, alpha):
    args = parse(tmp_path, "--distillation", "hard", "--teacher", teacher_checkpoint, "--mixup", "0", "--cutmix", "0",
                 "--distillation-alpha", str(alpha), *DISTILL_RUN)
    torch.manual_seed(0)
    start = shvit.create_model("shvit_s1", num_classes=4, depth=(1, 1, 1), distillation=True)
    result = shvit_train.train(args)
    model = result["model"]
    assert model.distillation and all(torch.isfinite(torch.tensor(result["losses"])))
    # alpha 1: only the teacher's term, so the class head's bias never moves; alpha 0: only the labels'.
    moved_cls = not torch.equal(model.head.l.bias, start.head.l.bias)
    moved_dist = not torch.equal(model.head_dist.l.bias, start.head_dist.l.bias)
    assert (moved_cls, moved_dist) == ((False, True) if alpha == 1.0 else (True, False))
    saved = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert saved["distillation"] and "head_dist.l.weight" in saved["state_dict"]


def test_cli_hard_distillation_on_synthetic_data(tmp_path, teacher_checkpoint):
    args = ["train", "--img-size", "64", "--depth", "1", "1", "1", "--synthetic-classes", "4", "--threads", "1",
            "--device", "cpu", "--output-dir", str(tmp_path), "--distillation", "hard", "--teacher", teacher_checkpoint,
            *DISTILL_RUN]
    assert cli_main(args) == 0
    assert (tmp_path / "checkpoint.pth").is_file()


def test_timm_teacher_with_local_weights(tmp_path):
    timm = require_timm()
    weights = tmp_path / "resnet.pth"
    torch.save({"model": timm.create_model("resnet10t", pretrained=False, num_classes=4).state_dict()}, weights)
    result = shvit_train.train(parse(tmp_path, "--distillation", "soft", "--teacher", "resnet10t",
                                     "--teacher-weights", str(weights), *DISTILL_RUN))
    assert result["model"].distillation


def test_bad_distillation_arguments(tmp_path, teacher_checkpoint, capsys):
    def run(*extra):
        base = ["train", "--img-size", "64", "--depth", "1", "1", "1", "--synthetic-classes", "4", "--device", "cpu",
                "--output-dir", str(tmp_path), *DISTILL_RUN]
        status = cli_main([*base, *extra])
        return status, capsys.readouterr().err

    status, err = run("--distillation", "hard")
    assert status == 2 and "--teacher" in err
    status, err = run("--distillation", "hard", "--teacher", "shvit_s4")
    assert status == 2 and "--teacher-weights" in err
    status, err = run("--distillation", "hard", "--teacher", str(tmp_path / "nope.pth"))
    assert status == 2 and "not found" in err
    status, err = run("--teacher", teacher_checkpoint)
    assert status == 2 and "--distillation hard or soft" in err
    status, err = run("--distillation", "hard", "--teacher", teacher_checkpoint, "--synthetic-classes", "3")
    assert status == 2 and "4 classes" in err and "3" in err
