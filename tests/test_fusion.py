"""Fusion heads: train-head --cache AUDIO --cache TEXT, one pooling branch per cache, one classifier."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conilium import CLASSES

from conilium.cli.evaluate import eval_group
from conilium.cli.heads import train_head_cmd
from conilium.errors import ConfigError
from conilium.heads.config import TrainConfig
from conilium.heads.grid import expand_spec, run_grid
from conilium.heads.model import EmotionHead, FusionHead
from conilium.heads.prepare import make_dataset, prepare
from conilium.heads.recipe import predict_heads, read_batches
from conilium.heads.train import load_head, plan_passes, train_head
from conilium.heads.data import length_batches
from conilium.runs import prediction_path, read_predictions
from conilium.testing import write_synthetic_cache

from test_grid_pass import assert_same_run


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two synthetic caches of the same 80 clips (the names are the clip numbers): 'audio' (dim 8,
    stored layers 1 and 3) and 'text' (dim 6, three stored layers), and a 'short' one of 50 clips."""
    base = tmp_path_factory.mktemp("fusion")
    audio = write_synthetic_cache(base / "audio", clips=80, dim=8, seed=1, signal=0.4)
    text = write_synthetic_cache(base / "text", clips=80, dim=6, seed=2, signal=0.4, stored_layers=(0, 1, 2),
                                 frames=(5, 15))
    short = write_synthetic_cache(base / "short", clips=50, dim=6, seed=2, frames=(5, 15))
    return {"audio": audio.path, "text": text.path, "short": short.path}


def _config(caches, more=("text",), **kw):
    kw.setdefault("epochs", 3)
    kw.setdefault("hidden", 16)
    kw.setdefault("batch_size", 8)
    return TrainConfig(cache=str(caches["audio"]), more_caches=tuple(str(caches[m]) for m in more), device="cpu",
                       threads=1, **kw)


@pytest.mark.parametrize("fusion", ["concat", "cross-attention"])
def test_cli_trains_a_fusion_head_and_writes_a_run_read_back_as_written(caches, tmp_path, fusion):
    out = tmp_path / "fusion"
    args = ["--cache", str(caches["audio"]), "--cache", str(caches["text"]), "--out", str(out), "--epochs", "3",
            "--hidden", "16", "--device", "cpu", "--fusion", fusion, "-q"]
    r = CliRunner().invoke(train_head_cmd, args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["f1_macro"] <= 1.0 and metrics["n"] > 0
    assert metrics["training"]["fusion"]["combine"] == fusion
    assert [b["input"]["dim"] for b in metrics["training"]["fusion"]["caches"]] == [8, 6]
    config = json.loads((out / "config.json").read_text())
    assert config["more_caches"] == [str(caches["text"].resolve())]
    assert TrainConfig.from_dict(config).more_caches == (str(caches["text"].resolve()),)
    # the checkpoint rebuilds the fusion head: each branch its own layer mix over its cache's layers
    model, ckpt = load_head(out, fusion=True)
    assert isinstance(model, FusionHead) and len(ckpt.branches) == 2 and ckpt.fusion == fusion
    assert (model.cross is not None) == (fusion == "cross-attention")
    assert [b.layer_mix.num_layers for b in model.branches] == [2, 3]
    assert [b["cache"] for b in ckpt.branches] == [str(caches["audio"].resolve()), str(caches["text"].resolve())]
    # its Development predictions are what the rebuilt head gives on the two caches' features
    written = read_predictions(prediction_path(out, "Development"))
    data = prepare(TrainConfig.from_dict(config))
    try:
        ds = make_dataset(data, written.names)
        read = read_batches(ds, length_batches(data.cache, written.names, 5, data.selection), torch.device("cpu"))
        probs = predict_heads([(model, "wbce")], read(), len(ds), device=torch.device("cpu"))[0]
    finally:
        data.close_more()
        data.cache.close()
    np.testing.assert_allclose(written.probs, probs, atol=6e-7)  # written with 6 decimals
    # rerun: done already, nothing trained
    r = CliRunner().invoke(train_head_cmd, args)
    assert r.exit_code == 0 and "complete already" in r.output, r.output
    # the other readers of a head run on new audio say why a fusion head is not theirs
    with pytest.raises(ConfigError, match="fusion head.*2 caches"):
        load_head(out)


def test_a_one_cache_config_json_has_no_fusion_key_and_old_ones_read_as_one_cache(caches, tmp_path):
    config = _config(caches, more=())
    assert "more_caches" not in config.to_json()
    train_head(config, tmp_path / "run", progress=False)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "more_caches" not in written and TrainConfig.from_dict(written).more_caches == ()
    model, ckpt = load_head(tmp_path / "run")
    assert isinstance(model, EmotionHead) and ckpt.branches is None
    assert "branches" not in torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert "fusion" not in json.loads((tmp_path / "run" / "metrics.json").read_text())["training"]


def test_missing_clips_are_named_with_their_count(caches, tmp_path):
    alone = prepare(_config(caches, more=()))
    alone.cache.close()
    short = {f"SYN_{i:05d}.wav" for i in range(50)}
    missing = [n for n in alone.train_names + alone.dev_names if n not in short]
    assert missing
    with pytest.raises(ConfigError, match=rf"lacks {len(missing)} Train/Development clip\(s\)") as e:
        train_head(_config(caches, more=("short",)), tmp_path / "run", progress=False)
    assert ", ".join(missing[:5]) in str(e.value) and str(caches["short"]) in str(e.value)
    assert not (tmp_path / "run" / "metrics.json").exists()
    # the CLI says it the same way
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(caches["audio"]), "--cache", str(caches["short"]),
                                            "--out", str(tmp_path / "cli"), "--device", "cpu", "-q"])
    assert r.exit_code != 0 and "lacks" in r.output and "SYN_000" in r.output, r.output


@pytest.mark.parametrize("kw, match", [(dict(pooled_stats=True), "--pooled-stats"),
                                       (dict(more=("audio",)), "given more than once"),
                                       (dict(more=(), fusion="cross-attention"), "give --cache more than once")])
def test_what_a_fusion_run_cannot_do_is_refused(caches, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train_head(_config(caches, **kw), tmp_path / "run", progress=False)


def test_noise_augmented_copies_read_their_source_clips_text(caches, tmp_path):
    audio = write_synthetic_cache(tmp_path / "aug", clips=80, dim=8, seed=1, signal=0.4, augmented_copies=6)
    config = TrainConfig(cache=str(audio.path), more_caches=(str(caches["text"]),), epochs=2, hidden=16,
                         device="cpu")
    data = prepare(config, cache=audio)
    try:
        copies = [n for n in data.train_names if "#aug" in n]
        assert copies  # the augmented copies of the X and O clips do not train
        ds = make_dataset(data, copies)
        assert ds.parts[1].names == [audio.source(n) for n in copies]
    finally:
        data.close_more()
    m = train_head(config, tmp_path / "run", progress=False)
    assert m["training"]["clips"] == len(data.train_names)


def test_the_out_dir_may_not_lie_in_any_of_the_caches(caches):
    with pytest.raises(ConfigError, match="inside the cache directory"):
        train_head(_config(caches), caches["text"] / "run", progress=False)


def test_fusion_runs_of_one_grid_pass_equal_their_solo_runs(caches, tmp_path):
    spec = {"common": {"cache": str(caches["audio"]), "more_caches": [str(caches["text"])], "epochs": 3,
                       "hidden": 16, "batch_size": 8, "device": "cpu", "threads": 1},
            "runs": [{"name": "wbce-S"},
                     {"name": "kld-P-mixup", "loss": "kld", "labels": "P", "mixup": 0.4, "pooling": "mean"},
                     {"name": "wbce-S-gender-balanced", "aux": "gender", "balanced_stage": 2},
                     {"name": "cross", "fusion": "cross-attention", "mixup": 0.4},
                     {"name": "audio-only", "more_caches": []}]}
    runs = expand_spec(spec)
    passes = plan_passes([c for _, c, _ in runs])
    assert passes == [[0, 1, 2, 3], [4]]  # fusion runs share a pass; the one-cache run reads other batches
    run_grid(runs, tmp_path / "grid", progress=False)
    for name, config, _ in runs[:4]:
        train_head(config, tmp_path / "solo" / name, progress=False)
        assert_same_run(tmp_path / "grid" / name, tmp_path / "solo" / name)
    gender = json.loads((tmp_path / "grid" / "wbce-S-gender-balanced" / "metrics.json").read_text())
    assert "gender" in gender["aux"] and "balanced_stage" in gender["training"]


def test_evaluate_and_tune_thresholds_read_a_fusion_run(caches, tmp_path):
    run = tmp_path / "run"
    train_head(_config(caches), run, progress=False)
    r = CliRunner().invoke(eval_group, ["metrics", str(run), "--draws", "0", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(eval_group, ["tune-thresholds", str(run), str(tmp_path / "tuned"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tuned" / "metrics.json").is_file()


@pytest.fixture(scope="module")
def demo_text_cache(demo_corpus, tmp_path_factory):
    """demo-text token states of the demo corpus's transcripts (every layer, float32)."""
    from conilium.extract import ExtractConfig, extract_features

    out = tmp_path_factory.mktemp("demo_text") / "demo-text"
    return extract_features(ExtractConfig("demo-text", random_init=True, layers="all"), demo_corpus, out,
                            device="cpu", verbose=False)


def test_demo_audio_and_text_caches_fuse_and_predict_run_reads_each_files_transcript(demo_cache, demo_text_cache,
                                                                                     demo_corpus, tmp_path):
    from conilium.cli.finetune import predict_cmd

    out = tmp_path / "fusion"
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(demo_cache), "--cache", str(demo_text_cache),
                                            "--out", str(out), "--epochs", "2", "--hidden", "16", "--device", "cpu",
                                            "-q"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [b["upstream"] for b in metrics["training"]["fusion"]["caches"]] == ["demo-wavlm", "demo-text"]
    assert metrics["n"] > 0 and 0.0 <= metrics["f1_macro"] <= 1.0
    # predict --run reads each file's transcript from the corpus layout (Transcripts/ beside Audios/);
    # a file without one gets an Error naming it and where it was looked for, the others are predicted
    wavs = sorted((demo_corpus / "Audios").iterdir())[:3]
    lonely = tmp_path / "elsewhere" / "recordings" / "lonely.wav"
    lonely.parent.mkdir(parents=True)
    lonely.write_bytes(wavs[0].read_bytes())
    csv_out = tmp_path / "p.csv"
    r = CliRunner().invoke(predict_cmd, ["--run", str(out), *map(str, wavs), str(lonely), "--out", str(csv_out),
                                         "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(csv_out.read_text())))
    assert [row["FileName"] for row in rows] == [str(w) for w in wavs] + [str(lonely)]
    assert all(row["Prediction"] and not row["Error"] for row in rows[:3])
    missing = tmp_path / "elsewhere" / "Transcripts" / "lonely.txt"
    assert "no transcript of" in rows[3]["Error"] and str(missing) in rows[3]["Error"] and not rows[3]["Prediction"]
    assert f"predict: {lonely}: no transcript" in r.stderr and "3 file(s) predicted, 1 failed" in r.stderr
    # the same file with the copy's transcript given by --transcripts: the same prediction as the corpus clip
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "lonely.txt").write_bytes((demo_corpus / "Transcripts" / f"{wavs[0].stem}.txt").read_bytes())
    r = CliRunner().invoke(predict_cmd, ["--run", str(out), str(lonely), "--transcripts", str(texts), "--device",
                                         "cpu", "-q"])
    assert r.exit_code == 0, r.output
    row = next(csv.DictReader(io.StringIO(r.stdout)))
    np.testing.assert_allclose([float(row[c]) for c in CLASSES], [float(rows[0][c]) for c in CLASSES], atol=1e-6)
    # a transcript that is not UTF-8 is reported as the corpus reader reports it; every file failed: exit 1
    (texts / "lonely.txt").write_bytes("caf\xe9".encode("latin-1"))
    r = CliRunner().invoke(predict_cmd, ["--run", str(out), str(lonely), "--transcripts", str(texts), "--device",
                                         "cpu", "-q"])
    assert r.exit_code == 1 and "not UTF-8 text" in r.stderr and "lonely.txt" in r.stderr, r.output


@pytest.fixture(scope="module")
def float32_fusion(small_demo_corpus, tmp_path_factory):
    """A fusion run over float32 caches of the small demo corpus (demo-wavlm cut at 3 s, three
    hidden states; demo-text, every hidden state), whose stored predictions predict --run must
    reproduce: no float16 rounding of the frames between the two."""
    from conilium.extract import ExtractConfig, extract_features

    base = tmp_path_factory.mktemp("fusion32")
    audio = extract_features(ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="1,2,3", max_seconds=3.0,
                                           dtype="float32"), small_demo_corpus, base / "audio", device="cpu",
                             verbose=False)
    text = extract_features(ExtractConfig("demo-text", random_init=True, layers="all", dtype="float32"),
                            small_demo_corpus, base / "text", device="cpu", verbose=False)
    runs = {}
    for fusion in ("concat", "cross-attention"):
        runs[fusion] = base / fusion
        train_head(TrainConfig(cache=str(audio), more_caches=(str(text),), epochs=2, hidden=16, device="cpu",
                               threads=1, fusion=fusion), runs[fusion], progress=False)
    return runs


@pytest.mark.parametrize("fusion", ["concat", "cross-attention"])
def test_predict_run_of_a_fusion_run_gives_the_runs_own_predictions(float32_fusion, small_demo_corpus, tmp_path,
                                                                     fusion):
    from conilium.cli.finetune import predict_cmd
    from conilium.finetune.predict import Predictor

    run = float32_fusion[fusion]
    written = read_predictions(prediction_path(run, "Development"))
    files = [small_demo_corpus / "Audios" / n for n in written.names[:8]]
    out = tmp_path / "p.csv"
    # the files are cut at the caches' 3 s, as in extraction
    r = CliRunner().invoke(predict_cmd, ["--run", str(run), *map(str, files), "--out", str(out), "--batch-size", "3",
                                         "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [row["FileName"] for row in rows] == [str(f) for f in files]
    np.testing.assert_allclose([[float(row[c]) for c in CLASSES] for row in rows], written.probs[:8], atol=1e-5)
    assert [row["Prediction"] for row in rows] == list(written.prediction[:8])
    # texts given in memory stand for the transcript files
    texts = [(small_demo_corpus / "Transcripts" / f"{f.stem}.txt").read_text() for f in files[:2]]
    res = Predictor(run=run, device="cpu").predict(files[:2], texts=texts)
    np.testing.assert_allclose(np.stack([x.probabilities for x in res]), written.probs[:2], atol=1e-5)
    # and the text counts: other words, other probabilities
    other = Predictor(run=run, device="cpu").predict(files[:2], texts=["happy happy joy"] * 2)
    assert np.abs(np.stack([x.probabilities for x in other]) - written.probs[:2]).max() > 1e-3


def test_what_predict_refuses_around_transcripts_and_fusion_runs(float32_fusion, small_demo_corpus, tmp_path):
    from conilium.cli.finetune import predict_cmd

    run = float32_fusion["concat"]
    wav = str(sorted((small_demo_corpus / "Audios").iterdir())[0])
    texts = tmp_path / "texts"
    texts.mkdir()
    # --transcripts needs a fusion run: not with --model, --onnx nor a run trained on audio alone
    for source in (["--model", str(run)], ["--onnx", str(tmp_path / "m.onnx")]):
        r = CliRunner().invoke(predict_cmd, [*source, wav, "--transcripts", str(texts)])
        assert r.exit_code == 2 and "--transcripts" in r.output, r.output
    audio_only = tmp_path / "audio-only"
    config = json.loads((run / "config.json").read_text())
    train_head(TrainConfig(cache=config["cache"], epochs=1, hidden=16, device="cpu", threads=1), audio_only,
               progress=False)
    r = CliRunner().invoke(predict_cmd, ["--run", str(audio_only), wav, "--transcripts", str(texts), "--device",
                                         "cpu"])
    assert r.exit_code == 2 and "--transcripts" in r.output and "not a fusion run" in r.output, r.output
    # a segment has no transcript of its own
    r = CliRunner().invoke(predict_cmd, ["--run", str(run), wav, "--segment", "fixed:1", "--device", "cpu"])
    assert r.exit_code == 2 and "--segment" in r.output and "fusion run" in r.output, r.output
    # the ONNX export stays refused: it runs one upstream over audio
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from conilium.finetune.onnx import export_onnx

    with pytest.raises(ConfigError, match="a fusion head"):
        export_onnx(tmp_path / "f.onnx", run=run)
    assert not (tmp_path / "f.onnx").exists()


def test_predict_asr_hears_each_files_text_as_corpus_transcribe_writes_it(float32_fusion, small_demo_corpus,
                                                                          tmp_path):
    """predict --asr MODEL: each file's text is what the Whisper model hears in it, decoded as
    `conilium corpus transcribe` decodes: the same probabilities as predict reading the transcripts
    that transcribe wrote with the same model; a file in which the model hears nothing is an error
    naming it, the others are predicted."""
    import shutil

    from conilium.cli.finetune import predict_cmd
    from conilium.extract.asr import transcribe_corpus
    from conilium.testing.asr import write_tiny_whisper_asr
    from conilium.transcripts import transcript_path, transcripts_dir

    run = float32_fusion["concat"]
    corpus = tmp_path / "corpus"
    shutil.copytree(small_demo_corpus, corpus)
    shutil.rmtree(transcripts_dir(corpus))
    asr = write_tiny_whisper_asr(tmp_path / "asr", seed=0)
    info = transcribe_corpus(corpus, str(asr), device="cpu", verbose=False)
    names = [n for n in read_predictions(prediction_path(run, "Development")).names
             if transcript_path(corpus, n).is_file()][:5]
    files = [str(corpus / "Audios" / n) for n in names]
    assert len(files) == 5 and not info["no_text"]

    # the same audio in a folder with no transcript beside it: the text can only come from --asr
    bare = tmp_path / "bare"
    bare.mkdir()
    copies = [str(shutil.copy(f, bare)) for f in files]

    def predict(paths, *args):
        out = tmp_path / f"p{len(list(tmp_path.glob('p*.csv')))}.csv"
        r = CliRunner().invoke(predict_cmd, ["--run", str(run), *paths, "--out", str(out), "--device", "cpu", "-q",
                                             *args])
        return r, list(csv.DictReader(io.StringIO(out.read_text()))) if out.exists() else []

    r, heard = predict(copies, "--asr", str(asr), "--batch-size", "2")
    assert r.exit_code == 0, r.output
    r, read = predict(files)  # the transcripts corpus transcribe wrote beside Audios/
    assert r.exit_code == 0, r.output
    r, _ = predict(copies)  # without --asr the bare copies have no text
    assert r.exit_code == 1 and "no transcript of" in r.output, r.output
    assert [h["FileName"] for h in heard] == copies
    assert [h["Prediction"] for h in heard] == [x["Prediction"] for x in read]
    np.testing.assert_allclose([[float(h[c]) for c in CLASSES] for h in heard],
                               [[float(x[c]) for c in CLASSES] for x in read], atol=1e-6)

    # a model that hears nothing in some files (decoding set up by the caller: 4 new tokens at most)
    from conilium.extract.asr import Transcriber
    from conilium.finetune.predict import Predictor

    silent = Transcriber(str(write_tiny_whisper_asr(tmp_path / "silent", seed=0, speak=False)), max_new_tokens=4)
    every = [str(corpus / "Audios" / n) for n in read_predictions(prediction_path(run, "Development")).names]
    texts = [None if i % 2 else "so happy about this" for i in range(len(every))]  # a text given: no ASR
    res = Predictor(run=run, device="cpu", asr=silent).predict(every, texts=texts)
    deaf = [x.file for x in res if x.error]
    assert deaf and all(f"heard no words in {x.file}" in x.error for x in res if x.error)
    assert set(deaf) <= {f for f, t in zip(every, texts) if t is None}
    assert all(x.probabilities is not None for x, t in zip(res, texts) if t is not None)

    # usage: --asr needs a fusion run, is not given with --transcripts, nor with a job
    for args in (["--model", str(run), files[0], "--asr", str(asr)],
                 ["--run", str(run), files[0], "--asr", str(asr), "--transcripts", str(tmp_path)],
                 ["--run", str(run), "--inputs", str(corpus / "Audios"), "--out", str(tmp_path / "job"),
                  "--asr", str(asr)]):
        r = CliRunner().invoke(predict_cmd, args)
        assert r.exit_code == 2 and "--asr" in r.output, (args, r.output)
