"""The audio-video emotion recognition example (examples/aver): model, data, features,
training and checkpoints. Small shapes throughout: the whole file runs in well under
a minute on two CPU cores."""

import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

# The example is a package `aver` under examples/; a distinct top-level name keeps
# its modules (model, data, ...) from clashing with anything else on sys.path.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

cv2 = pytest.importorskip("cv2", reason="the example's video reader needs opencv")
pytest.importorskip("torchvision", reason="the example's frame embeddings need torchvision")

from aver import audio, data, evaluate, metrics, model, train, video  # noqa: E402
from aver.extract_features import ClipExtractor, ExtractConfig, extract_all, find_clips  # noqa: E402

import fbp_kernels  # noqa: E402

HAS_MFH = hasattr(fbp_kernels, "MultimodalFactorizedHighOrderPooling")
FUSIONS = ["fbp", "concat", "audio", "video"] + (["mfh"] if HAS_MFH else [])


# One torch thread for every test here (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(lengths_a=(7, 3, 5), lengths_v=(4, 6, 2), da=10, dv=12):
    clips = [{"clip_id": f"c{i}", "label": i % 7, "audio": torch.randn(ta, da),
              "video": torch.randn(tv, dv)} for i, (ta, tv) in enumerate(zip(lengths_a, lengths_v))]
    return clips, data.collate_clips(clips)


def small_model(fusion="fbp", pooling="attention", **kw):
    cfg = model.AVERConfig(audio_dim=10, video_dim=12, hidden=16, fbp_out=8, factor=3,
                           fusion=fusion, pooling=pooling, **kw)
    return model.AttentionAVER(cfg)


def run(m, b, **kw):
    return m(b["audio"], b["audio_mask"], b["video"], b["video_mask"], **kw)


# ------------------------------------------------------------------------ model

@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_model_shapes_and_gradients(fusion, pooling):
    _, b = make_batch()
    m = small_model(fusion, pooling).train()
    logits, weights = run(m, b, return_weights=True)
    assert logits.shape == (3, 7)
    expected = {"audio": ["audio"], "video": ["video"]}.get(fusion, ["audio", "video"])
    assert sorted(weights) == expected
    for name, w in weights.items():
        assert w.shape == b[f"{name}_mask"].shape
        torch.testing.assert_close(w.sum(-1), torch.ones(3))
    logits.logsumexp(-1).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert sum(p.grad.abs().sum() for p in m.parameters()) > 0


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_padded_frames_get_zero_weight_and_cannot_change_the_output(pooling):
    clips, b = make_batch()
    m = small_model("fbp", pooling).eval()
    logits, weights = run(m, b, return_weights=True)
    for name in ("audio", "video"):
        pad = ~b[f"{name}_mask"]
        assert pad.any(), "the batch must contain padding for this test to mean anything"
        assert (weights[name][pad] == 0).all()
        assert (weights[name][~pad] > 0).all()
    # Garbage, even NaN and Inf, in the padded frames must not reach the output.
    poisoned = dict(b)
    for name in ("audio", "video"):
        x = b[name].clone()
        x[~b[f"{name}_mask"]] = torch.tensor([float("nan"), float("inf"), 1e6]).repeat(
            x.shape[-1])[: x.shape[-1]]
        poisoned[name] = x
    assert torch.equal(run(m, poisoned), logits)
    # ... nor the gradients, in training mode.
    m.train()
    run(m, poisoned).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    # A clip alone (no padding) gives the same logits as inside the padded batch.
    for i, clip in enumerate(clips):
        alone = data.collate_clips([clip])
        torch.testing.assert_close(run(m, alone)[0], logits[i], rtol=1e-5, atol=1e-6)


def test_model_rejects_bad_input():
    _, b = make_batch()
    m = small_model()
    with pytest.raises(ValueError, match="no valid frames"):
        mask = b["audio_mask"].clone()
        mask[1] = False
        m(b["audio"], mask, b["video"], b["video_mask"])
    with pytest.raises(ValueError, match="bool"):
        m(b["audio"], b["audio_mask"].float(), b["video"], b["video_mask"])
    with pytest.raises(ValueError, match=r"\(B, T, 10\)"):
        m(b["audio"][..., :5], b["audio_mask"], b["video"], b["video_mask"])
    with pytest.raises(ValueError, match="fusion"):
        model.AVERConfig(audio_dim=1, video_dim=1, fusion="sum")


@pytest.mark.skipif(HAS_MFH, reason="fbp_kernels provides MFH; the guard is not reachable")
def test_mfh_without_package_support_says_so():
    with pytest.raises(RuntimeError, match="MultimodalFactorizedHighOrderPooling"):
        small_model("mfh")


# ------------------------------------------------------------------------ data

def test_synthetic_label_is_an_audio_video_interaction():
    task = data.SyntheticTask(audio_dim=8, video_dim=8)
    clips = task.sample(300, seed=3)
    a = np.array([c["meta"]["audio_token"] for c in clips])
    v = np.array([c["meta"]["video_token"] for c in clips])
    y = np.array([c["label"] for c in clips])
    assert (y == (a + v) % 7).all()
    for c in clips:
        for m, frames in (("audio", c["audio"]), ("video", c["video"])):
            sal = c["meta"][f"{m}_salient"]
            assert sal.sum() == task.salient and len(sal) == frames.shape[0]
    # Deterministic in the seed, different across seeds.
    assert torch.equal(task.sample(2, seed=3)[1]["audio"], clips[1]["audio"])
    assert not torch.equal(task.sample(2, seed=4)[1]["audio"], clips[1]["audio"])


def test_collate_pads_with_zeros_and_masks(tmp_path):
    clips, b = make_batch()
    assert b["audio"].shape == (3, 7, 10) and b["video"].shape == (3, 6, 12)
    assert b["audio_mask"].sum(1).tolist() == [7, 3, 5]
    assert (b["audio"][1, 3:] == 0).all()
    assert torch.equal(b["video"][2, :2], clips[2]["video"])
    # Round trip through the on-disk format and the split convention.
    for c in clips:
        data.save_clip(c, tmp_path)
    data.write_split(tmp_path / "splits" / "val.txt", ["c2", "c0"])
    ds = data.ClipDataset(tmp_path, "val")
    assert len(ds) == 2 and torch.equal(ds[0]["audio"], clips[2]["audio"])
    data.write_split(tmp_path / "splits" / "bad.txt", ["c0", "missing"])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        data.ClipDataset(tmp_path, "bad")


def test_carve_split_is_stratified_and_disjoint(tmp_path):
    data.write_synthetic(tmp_path, sizes=(70, 7, 7), seed=1)
    train_ids = set(data.read_split(tmp_path / "splits" / "train.txt"))
    counts = data.carve_split(tmp_path, "train", "holdout", fraction=0.2, seed=0)
    kept = set(data.read_split(tmp_path / "splits" / "train.txt"))
    moved = set(data.read_split(tmp_path / "splits" / "holdout.txt"))
    assert kept | moved == train_ids and not kept & moved
    assert counts == {"train": len(kept), "holdout": len(moved)}
    labels = [data.load_clip(tmp_path / f"{i}.pt")["label"] for i in sorted(train_ids)]
    per_class = np.bincount(labels, minlength=7)
    moved_per_class = np.bincount([data.load_clip(tmp_path / f"{i}.pt")["label"]
                                   for i in moved], minlength=7)
    assert (moved_per_class == np.round(0.2 * per_class)).all()
    with pytest.raises(FileExistsError):
        data.carve_split(tmp_path, "train", "holdout")


# ------------------------------------------------------------------------ training

def tiny_args(tmp_path, *extra):
    return train.build_parser().parse_args(
        ["--synthetic", "--synthetic-sizes", "48", "16", "16", "--hidden", "16", "--fbp-out",
         "8", "--batch-size", "16", "--no-progress", "--out", str(tmp_path), *extra])


def test_a_few_training_steps_lower_the_loss():
    task = data.SyntheticTask(audio_dim=10, video_dim=12)
    batch = data.collate_clips(task.sample(32, seed=0))
    m = small_model(dropout=0.0, fbp_dropout=0.0)
    args = train.build_parser().parse_args(["--synthetic", "--lr", "1e-2", "--epochs", "1", "--warmup-epochs", "0"])
    # A schedule longer than the 60 steps taken, so the learning rate stays up and the
    # loss keeps falling instead of freezing where the cosine reaches zero (a frozen
    # loss made the old 0.4-drop threshold a coin toss between CPUs: 0.398 vs 0.40).
    opt, sched = train.make_optimizer(m, args, steps_per_epoch=200)
    losses = [train.train_step(m, batch, opt, sched, torch.device("cpu")) for _ in range(60)]
    # Chance level is log(7) = 1.95.  Fitting one batch of 32 halves the loss well within
    # 60 steps: measured 0.72-0.78 at step 60 (from 2.02) with the AVX-512 and AVX2 code
    # paths of ATen and MKL, alone and together (issue 11), and 0.58-0.66 for init seeds
    # 1-3, against a bound of ~1.0 here: CPU-dependent rounding moved it by < 0.06.
    # The second check is that it is still falling, not stalled.
    assert losses[0] > 1.8, losses
    assert losses[-1] < losses[0] / 2, losses
    assert losses[-1] < losses[30] - 0.1, losses
    with torch.no_grad():
        m.eval()
        acc = (run(m, batch).argmax(-1) == batch["label"]).float().mean().item()
    # Measured 0.94-1.0 over those code paths and seeds (7 classes, chance 0.14).
    assert acc >= 0.75, acc


def test_checkpoint_resume_continues_exactly(tmp_path):
    full = train.train(tiny_args(tmp_path / "full", "--epochs", "2"))
    train.train(tiny_args(tmp_path / "part", "--epochs", "1"))
    resumed = train.train(train.build_parser().parse_args(
        ["--resume", str(tmp_path / "part" / "last.pt"), "--epochs", "2", "--no-progress"]))
    assert [h["train_loss"] for h in resumed["history"]] == \
        [h["train_loss"] for h in full["history"]]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # The run ends with the test report: metrics JSON and the confusion matrix PNG.
    results = json.loads((tmp_path / "full" / "test_results.json").read_text())
    assert {"accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"} <= set(results)
    assert (tmp_path / "full" / "test_confusion.png").stat().st_size > 1000
    # evaluate.py on best.pt reproduces the validation accuracy recorded for that epoch.
    best = full["history"][full["best"]["epoch"]]
    again = evaluate.main(["--checkpoint", str(tmp_path / "full" / "best.pt"), "--synthetic",
                           "--split", "val", "--out", str(tmp_path / "eval")])
    assert again["accuracy"] == best["val_accuracy"]
    assert (tmp_path / "eval" / "eval_val_results.json").exists()
    # ... without touching the report training wrote.
    assert json.loads((tmp_path / "full" / "test_results.json").read_text()) == results


def test_metrics_on_a_known_confusion():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])
    cm = metrics.confusion_matrix(labels, preds, 4)
    assert cm.tolist()[:3] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0]]
    s = metrics.summarize(cm, ["a", "b", "c", "d"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5, "d": None}
    # F1: a 2*1/(2+2)=0.5, b 2*2/(2+3)=0.8, c 2*1/(2+1)=2/3; d has no examples.
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix(np.array([5]), np.array([0]), 4)


# ------------------------------------------------------------------------ features

def test_wav_reading_and_log_mel(tmp_path):
    rate = 16000
    t = np.arange(rate // 2) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    audio.write_wav(tmp_path / "a.wav", tone, rate)
    samples, r = audio.read_wav(tmp_path / "a.wav")
    assert r == rate and np.abs(samples - tone).max() < 1e-4
    # 24-bit stereo: the reader decodes 3-byte samples and mixes channels to mono.
    pcm = (np.stack([tone, -tone / 2], 1) * 2**23).astype("<i4")
    raw = np.stack([(pcm >> s) & 0xFF for s in (0, 8, 16)], -1).astype(np.uint8).tobytes()
    with wave.open(str(tmp_path / "b.wav"), "wb") as f:
        f.setnchannels(2), f.setsampwidth(3), f.setframerate(rate), f.writeframes(raw)
    samples, _ = audio.read_wav(tmp_path / "b.wav")
    assert np.abs(samples - tone / 4).max() < 1e-4
    cfg = audio.MelConfig(n_mels=40)
    frames = audio.wav_to_frames(tmp_path / "a.wav", cfg)
    assert frames.shape == (1 + len(tone) // 160, 40) and frames.dtype == torch.float32
    centres = audio.mel_to_hz(np.linspace(audio.hz_to_mel(cfg.fmin), audio.hz_to_mel(cfg.fmax),
                                          cfg.n_mels + 2))[1:-1]
    peak = centres[int(frames.mean(0).argmax())]
    assert 850 < peak < 1150, peak
    (tmp_path / "c.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(ValueError):
        audio.read_wav(tmp_path / "c.wav")


# The Haar-detectable cartoon face of the demo-media generator (one drawing, shared).
from aver.make_demo_media import draw_face  # noqa: E402


def face_frame():
    """A 320x200 frame with the face off-centre (left), so a face crop != centre crop."""
    frame = np.full((200, 320, 3), 30, np.uint8)
    frame[20:180, 10:170] = draw_face(160)
    return frame


def write_avi(path, frames, fps=10):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
    for f in frames:
        writer.write(f)
    writer.release()


def test_crop_uses_the_largest_face_else_the_centre():
    frame = face_frame()
    crop, found = video.crop_face(frame, None)
    assert not found and crop.shape == (200, 200, 3)
    assert np.array_equal(crop, frame[:, 60:260])  # the documented fallback: centre square
    boxes = [(10, 10, 5, 5), (40, 50, 100, 100)]
    crop, found = video.crop_face(frame, lambda img: boxes, margin=0.2)
    assert found and crop.shape == (140, 140, 3)  # 100 * (1 + 2 * 0.2), largest box
    assert np.array_equal(crop, frame[30:170, 20:160])


@pytest.mark.skipif(not video.haar_available(),
                    reason=f"OpenCV {cv2.__version__} ships no Haar cascade (removed in OpenCV 5); "
                           f"extraction falls back to centre crops")
def test_haar_detector_finds_the_drawn_face():
    detect = video.make_face_detector("haar")
    boxes = detect(face_frame())
    assert boxes, "the drawn face was not detected"
    x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])[:4]
    assert 10 <= x + w / 2 <= 170 and 20 <= y + h / 2 <= 180  # inside the face's square


def test_feature_extraction_from_media_files(tmp_path):
    root = tmp_path / "media"
    for label, clip_id, seconds in (("Happy", "clip1", 1.0), ("Sad", "clip2", 0.6)):
        (root / label).mkdir(parents=True, exist_ok=True)
        frames = [np.roll(face_frame(), 3 * i, axis=1) for i in range(int(10 * seconds))]
        write_avi(root / label / f"{clip_id}.avi", frames, fps=10)
        t = np.arange(int(16000 * seconds)) / 16000
        audio.write_wav(root / label / f"{clip_id}.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    (root / "Sad" / "broken.avi").write_bytes(b"not a video")
    audio.write_wav(root / "Sad" / "broken.wav", np.zeros(1600), 16000)
    (root / "Happy" / "noaudio.avi").write_bytes((root / "Happy" / "clip1.avi").read_bytes())

    classes = list(data.EMOTIONS)
    sources, ignored = find_clips(root, classes)
    assert sorted(s.clip_id for s in sources) == ["broken", "clip1", "clip2", "noaudio"]
    config = ExtractConfig(fps=5, max_frames=4, image_size=64, backbone="resnet18",
                           face_detector="haar" if video.haar_available() else "none")
    with pytest.warns(UserWarning, match="random weights"):
        extractor = ClipExtractor(config)
    report = extract_all(sources, tmp_path / "feats", extractor, classes, split="train",
                         progress=False)
    assert sorted(report["written"]) == ["clip1", "clip2"]
    assert set(report["failed"]) == {"broken", "noaudio"}
    assert "no audio file" in report["failed"]["noaudio"]
    assert data.read_split(tmp_path / "feats" / "splits" / "train.txt") == ["clip1", "clip2"]

    clip = data.load_clip(tmp_path / "feats" / "clip1.pt")
    assert clip["clip_id"] == "clip1" and clip["label"] == classes.index("happy")
    assert clip["audio"].shape == (1 + 16000 // 160, 64)
    assert clip["video"].shape == (4, 512) and torch.isfinite(clip["video"]).all()
    assert clip["face_found"].shape == (4,)
    assert clip["face_found"].all() == video.haar_available()
    assert data.load_clip(tmp_path / "feats" / "clip2.pt")["video"].shape == (3, 512)

    # The extracted directory is a training set as it stands.
    ds = data.ClipDataset(tmp_path / "feats", "train")
    b = data.collate_clips([ds[0], ds[1]])
    m = model.AttentionAVER(model.AVERConfig(audio_dim=64, video_dim=512, hidden=8, fbp_out=4))
    assert run(m, b).shape == (2, 7)

    # Re-running skips what exists instead of redoing it.
    again = extract_all(sources, tmp_path / "feats", extractor, classes, progress=False)
    assert sorted(again["existing"]) == ["clip1", "clip2"] and not again["written"]


def test_extraction_cli_with_a_manifest(tmp_path, capsys):
    from aver import extract_features

    write_avi(tmp_path / "v.avi", [face_frame()] * 4, fps=10)
    audio.write_wav(tmp_path / "a.wav", np.zeros(4000), 16000)
    (tmp_path / "clips.csv").write_text("clip_id,label,video,audio\n"
                                        "x1,b,v.avi,a.wav\n"
                                        "x2,,v.avi,a.wav\n"
                                        "x3,zebra,v.avi,a.wav\n")
    with pytest.warns(UserWarning, match="random weights"):
        report = extract_features.main(
            ["--manifest", str(tmp_path / "clips.csv"), str(tmp_path / "out"), "--classes",
             "a,b", "--face-detector", "none", "--image-size", "32", "--max-frames", "2",
             "--no-progress", "--split", "test"])
    assert sorted(report["written"]) == ["x1", "x2"]
    assert "zebra" in report["failed"]["x3"]
    assert "skipped x3" in capsys.readouterr().out
    assert data.load_clip(tmp_path / "out" / "x1.pt")["label"] == 1
    assert data.load_clip(tmp_path / "out" / "x2.pt")["label"] == -1  # unlabelled
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["a", "b"]
    assert data.read_split(tmp_path / "out" / "splits" / "test.txt") == ["x1", "x2"]
