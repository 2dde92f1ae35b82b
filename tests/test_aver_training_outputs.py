"""examples/aver training: per-epoch metrics, curves, resume warnings, paths that work
from any folder, class counts and weights, one-line CLI errors, --help defaults, the
ablation's output place, and the temporal audio encoder."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("cv2", reason="the example's video reader needs opencv")
pytest.importorskip("torchvision", reason="the example's frame embeddings need torchvision")

from aver import ablation, cli, data, evaluate, extract_features, model, predict, train  # noqa: E402


# One torch thread for every test here (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--hidden", "8", "--fbp-out", "4", "--batch-size", "8", "--no-progress"]


def test_metrics_csv_curves_absolute_paths_and_evaluation_elsewhere(tmp_path, monkeypatch):
    data.write_synthetic(tmp_path / "syn", sizes=(24, 8, 8), seed=0)
    monkeypatch.chdir(tmp_path)  # train with relative paths, as a user would
    train.main(["--data", "syn", "--out", "runs/a", "--epochs", "2", *TINY])
    with open(tmp_path / "runs/a/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    history = json.loads((tmp_path / "runs/a/history.json").read_text())
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [float(r["val_accuracy"]) for r in rows] == [h["val_accuracy"] for h in history]
    assert (tmp_path / "runs/a/training_curves.png").stat().st_size > 5000
    state = torch.load(tmp_path / "runs/a/best.pt", weights_only=False)
    assert Path(state["args"]["data"]) == tmp_path / "syn"  # absolute
    assert state["classes"] == list(data.EMOTIONS)
    # Evaluation from another folder finds the data through the checkpoint alone.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = evaluate.main(["--checkpoint", str(tmp_path / "runs/a/best.pt"), "--split", "val"])
    assert res["accuracy"] == history[state["best"]["epoch"]]["val_accuracy"]
    assert (tmp_path / "runs/a/eval_val_results.json").exists()
    assert (tmp_path / "runs/a/test_results.json").exists()  # training's report is still there


def test_resume_warns_about_every_argument_it_ignores(tmp_path, capsys):
    train.main(["--synthetic", "--synthetic-sizes", "16", "8", "8", "--epochs", "1",
                "--out", str(tmp_path / "a"), *TINY])
    capsys.readouterr()
    out = train.main(["--resume", str(tmp_path / "a" / "last.pt"), "--epochs", "2",
                      "--out", str(tmp_path / "b"), "--lr", "0.1", "--fusion", "concat",
                      "--no-progress"])
    err = capsys.readouterr().err
    assert "--resume continues the checkpoint's run and ignores" in err
    for option, value in (("--out", str(tmp_path / "b")), ("--lr", "0.1"),
                          ("--fusion", "'concat'")):
        assert f"{option} " in err and value in err, (option, err)
    assert "--epochs" not in err.split("ignores")[1].split(";")[0]  # allowed to change
    assert out["out"] == tmp_path / "a" and not (tmp_path / "b").exists()
    # Passing the checkpoint's own value, or nothing, is not warned about.
    train.main(["--resume", str(tmp_path / "a" / "last.pt"), "--epochs", "2",
                "--lr", "0.003", "--no-progress"])
    assert "ignores" not in capsys.readouterr().err


def test_class_counts_warning_and_balanced_weights(tmp_path, capsys):
    feats = data.write_synthetic(tmp_path / "syn", sizes=(40, 8, 8), seed=0)
    train_ids = data.read_split(feats / "splits" / "train.txt")
    keep = [i for i in train_ids if data.load_clip(feats / f"{i}.pt")["label"] != 2]
    data.write_split(feats / "splits" / "train.txt", keep)
    ds = data.ClipDataset(feats, "train")
    counts = train.class_counts(ds, 7)
    assert counts[2] == 0 and counts.sum() == len(keep)
    w = train.loss_weights(counts, "balanced")
    present = counts > 0
    assert w[2] == 0 and torch.allclose((w[present] * torch.tensor(counts[present])).float(),
                                        torch.full((int(present.sum()),), len(keep) / 6.0))
    assert train.loss_weights(counts, "none") is None
    train.main(["--data", str(feats), "--out", str(tmp_path / "r"), "--epochs", "1",
                "--class-weights", "balanced", *TINY])
    assert "no training clips for classes ['fear']" in capsys.readouterr().err


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    def bad():
        raise FileNotFoundError("split file x/train.txt not found")
    with pytest.raises(SystemExit) as e:
        cli.run_main(bad)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: split file x/train.txt not found\n"
    # The real script, end to end (one subprocess: imports cost a few seconds).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AVER_TRACEBACK", None)
    r = subprocess.run([sys.executable, str(EXAMPLES / "aver" / "train.py"), "--data",
                        str(tmp_path / "nowhere"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: split file"), r.stderr


@pytest.mark.parametrize("main", [train.main, evaluate.main, predict.main, ablation.main,
                                  extract_features.main],
                         ids=["train", "evaluate", "predict", "ablation", "extract_features"])
def test_help_shows_defaults(main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "(default:" in text, text


def test_ablation_writes_to_runs_unless_asked_to_update_results(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "HERE", tmp_path)  # so --update-results cannot touch the repo
    args = ["--seeds", "0", "--epochs", "1", "--synthetic-sizes", "16", "8", "8",
            "--variants", "FBP + attention", "--runs", str(tmp_path / "runs")]
    ablation.main(args + ["--extra", *TINY])
    assert (tmp_path / "runs" / "ablation.md").exists()
    assert not (tmp_path / "results").exists()
    ablation.main(args + ["--update-results", "--extra", *TINY])
    md = (tmp_path / "results" / "ablation.md").read_text()
    assert "--update-results" in md and "FBP + attention" in md


# ------------------------------------------------------------------------ audio encoder

def test_temporal_encoder_receptive_field_and_loudness():
    torch.manual_seed(0)
    enc = model.TemporalEncoder(6, 8, dropout=0.0).eval()
    assert enc.receptive_field == 63  # 0.63 s at 100 frames/s
    x = torch.randn(1, 100, 6, requires_grad=True)
    mask = torch.ones(1, 100, dtype=torch.bool)
    # Which input frames reach output frame 50 (apart from the utterance statistics,
    # which every frame enters): exactly those within +-31 frames.
    norm = model.masked_utterance_norm(x, mask).detach().requires_grad_(True)
    h = enc.proj(norm)
    for conv in enc.convs:
        h = h + torch.nn.functional.gelu(conv(h.transpose(1, 2)).transpose(1, 2))
    h[0, 50].sum().backward()
    reach = (norm.grad[0].abs().sum(-1) > 0).nonzero().flatten()
    assert reach.min() == 50 - 31 and reach.max() == 50 + 31
    # Loudness: one frame louder by a constant across bands (a log-mel gain) changes the
    # temporal encoder's output, while per-frame LayerNorm (FrameEncoder) cannot see it.
    frame_enc = model.FrameEncoder(6, 8, dropout=0.0).eval()
    louder = x.detach().clone()
    louder[0, 40] += 3.0
    with torch.no_grad():
        assert torch.allclose(frame_enc(x, mask), frame_enc(louder, mask), atol=1e-5)
        assert (enc(x, mask) - enc(louder, mask)).abs().max() > 1e-2
        # ... while a gain on the whole utterance (recording level) changes nothing.
        assert torch.allclose(enc(x, mask), enc(x + 3.0, mask), atol=1e-4)


def test_temporal_encoder_ignores_padding_and_trains():
    cfg = model.AVERConfig(audio_dim=10, video_dim=12, hidden=16, fbp_out=8, factor=3,
                           audio_encoder="temporal")
    m = model.AttentionAVER(cfg).eval()
    clips = [{"clip_id": f"c{i}", "label": i, "audio": torch.randn(t, 10),
              "video": torch.randn(4, 12)} for i, t in enumerate((40, 9, 25))]
    b = data.collate_clips(clips)
    logits = m(b["audio"], b["audio_mask"], b["video"], b["video_mask"])
    poisoned = b["audio"].clone()
    poisoned[~b["audio_mask"]] = float("nan")
    assert torch.equal(m(poisoned, b["audio_mask"], b["video"], b["video_mask"]), logits)
    for i, clip in enumerate(clips):
        alone = data.collate_clips([clip])
        torch.testing.assert_close(m(alone["audio"], alone["audio_mask"], alone["video"],
                                     alone["video_mask"])[0], logits[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="audio_encoder"):
        model.AVERConfig(audio_dim=1, video_dim=1, audio_encoder="lstm")


def test_training_refuses_a_split_with_other_feature_settings(tmp_path):
    from aver.feature_settings import FeatureMismatchError

    feats = data.write_synthetic(tmp_path / "syn", sizes=(16, 8, 8), seed=0)
    intruder = data.SyntheticTask(seed=99).sample(1, seed=5, prefix="x")[0]
    data.save_clip(intruder, feats)
    val = data.read_split(feats / "splits" / "val.txt")
    data.write_split(feats / "splits" / "val.txt", [intruder["clip_id"]] + val)
    with pytest.raises(FeatureMismatchError, match=rf"{intruder['clip_id']}.pt differs from the "
                                                    rf"train split's first clip.*task_seed 99"):
        train.main(["--data", str(feats), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY])
