"""The study's steps: each one of the project's own commands, run as a subprocess."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from conilium.dirs import ModelDir, RunDir, StudyDir
from conilium.errors import ConiliumError
from conilium.util import atomic_path, write_json

#: Table 1 rows (the paper's upstream names) → registry names, for real corpora and for the demo.
REAL_UPSTREAMS = {"WavLM-large": "wavlm-large", "Wav2vec2-large": "wav2vec2-large-robust",
                  "Wav2vec2-base": "wav2vec2-base", "Hubert-large": "hubert-large"}
DEMO_UPSTREAMS = {"WavLM-large": "demo-wavlm", "Wav2vec2-large": "demo-wav2vec2-large",
                  "Wav2vec2-base": "demo-wav2vec2-base", "Hubert-large": "demo-hubert"}
#: Upstreams beyond the paper's four (2025 systems), each as (real, demo) registry names: a row of
#: Table 1's kind (WCE on hard labels, frozen features), left out of the paper's comparisons.
BEYOND_UPSTREAMS = {"Whisper-large-v3": ("whisper-large-v3", "demo-whisper")}
TABLE2_ROWS = {"WCE": "wce-hard", "WBCE(P)": "wbce-P", "WBCE(S)": "wbce-S", "KLD(P)": "kld-P", "KLD(S)": "kld-S"}
SAMPLER_ROWS = {"BCE(P)": "bce-P", "BCE(P) + sampler": "bce-P-balanced", "BCE(S)": "bce-S",
                "BCE(S) + sampler": "bce-S-balanced", "KLD(P) + sampler": "kld-P-balanced",
                "KLD(S) + sampler": "kld-S-balanced"}
#: Runs beyond the paper, on the Table 2 cache: arousal/valence/dominance alone and jointly with
#: WBCE(S) (report: "attributes"), and WBCE(S) also trained on X and O clips (a Table 2 row).
ATTRIBUTE_ROWS = {"Attributes": "avd", "WBCE(S) + attributes": "wbce-S-avd"}
XO_ROW = ("WBCE(S) + X/O", "wbce-S-xo")
EXTRA_SPEC = {
    "description": "beyond the paper: arousal, valence, dominance (CCC loss) alone and with WBCE(S); "
                   "WBCE(S) also trained on X and O clips",
    "runs": [{"name": "avd", "task": "attributes"},
             {"name": "wbce-S-avd", "task": "joint", "loss": "wbce", "labels": "S"},
             {"name": "wbce-S-xo", "loss": "wbce", "labels": "S", "train_on_xo": True}],
}
#: The text upstream beyond the paper (real, demo registry names): its cache holds the transcripts'
#: token states; Table 2's WBCE(S) is trained on it alone and fused with the audio cache.
TEXT_UPSTREAM = ("roberta-large", "demo-text")
#: Table 2 rows beyond the paper, on the text cache and on audio + text: label → (run name, spec).
MODALITY_ROWS = {
    "Text only, WBCE(S)": ("text-wbce-S", {}),
    "Audio + text (concat), WBCE(S)": ("fusion-wbce-S", {"fusion": "concat"}),
    "Audio + text (cross-attention), WBCE(S)": ("cross-wbce-S", {"fusion": "cross-attention"}),
}
TABLE3_ROWS = {"WBCE(P*)": "wbce-Pstar", "WBCE(S*)": "wbce-Sstar", "KLD(P*)": "kld-Pstar-balanced",
               "KLD(S*)": "kld-Sstar-balanced"}


class StepFailed(ConiliumError):
    pass


@dataclass(frozen=True)
class StudyConfig:
    corpus: Optional[str] = None  # None: the demo corpus
    out: str = "results"
    cache_dir: Optional[str] = None  # default: <out>/cache
    demo_clips: int = 400
    seed: int = 0
    #: The head grids' seeds (train-grid --seeds): every head configuration trained once per seed,
    #: the report showing each row's mean ± sd over them; empty: one seed, ``seed``.
    seeds: Tuple[int, ...] = ()
    device: str = "auto"
    batch_seconds: Optional[float] = None  # extraction batch bound
    batch_size: Optional[int] = None  # head batch size
    epochs: Optional[int] = None  # head epochs (demo: 20, real: train-head's default)
    finetune_epochs: Optional[int] = None  # demo: 2, real: finetune-best's default
    finetune_batch_size: Optional[int] = None
    n_jobs: int = 2
    skip_bad: bool = False
    allow_symlinks: bool = False  # audio through symbolic links in Audios/ that point outside it
    skip_finetune: bool = False
    noise: Optional[str] = None  # noise recordings (e.g. MUSAN) for section 3.2; the demo makes its own
    upstreams: Dict[str, str] = field(default_factory=dict)
    paper_only: bool = False  # leave out the rows beyond the paper (Whisper upstream, ...)
    quiet: bool = False  # every step without its progress bars

    @property
    def demo(self) -> bool:
        return self.corpus is None


class Study:
    def __init__(self, config: StudyConfig):
        self.c = config
        self.out = Path(config.out).resolve()
        self.results = StudyDir(self.out)
        self.cache_dir = Path(config.cache_dir).resolve() if config.cache_dir else self.out / "cache"
        self.runs = self.results.runs
        self.bin = Path(sys.executable).parent
        self.upstreams = dict(config.upstreams) or (DEMO_UPSTREAMS if config.demo else REAL_UPSTREAMS)
        self.beyond = {} if config.paper_only else {
            label: names[1] if config.demo else names[0] for label, names in BEYOND_UPSTREAMS.items()}
        self.corpus = (self.out / "demo_corpus") if config.demo else Path(config.corpus).resolve()
        self.noise = (self.out / "demo_noise") if config.demo else (Path(config.noise).resolve() if config.noise else None)
        self.step_no = 0
        self.log: List[str] = []
        self.t0 = time.time()

    # ------------------------------------------------------------------ plumbing
    def say(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def run(self, name: str, argv: Sequence[str], *, skip_if: Optional[Path] = None) -> None:
        """Run one step; skip it when ``skip_if`` exists (its output is complete)."""
        self.step_no += 1
        cmd = [str(self.bin / argv[0]) if (self.bin / argv[0]).exists() else argv[0], *map(str, argv[1:])]
        shown = " ".join(shlex.quote(str(a)) for a in argv)
        if skip_if is not None and Path(skip_if).exists():
            self.say(f"step {self.step_no}: {name}: done already ({skip_if.relative_to(self.out) if self.out in Path(skip_if).parents else skip_if}), reused")
            self.log.append(f"# {name} (reused)\n{shown}")
            return
        self.say(f"step {self.step_no}: {name}\n    $ {shown}")
        self.log.append(f"# {name}\n{shown}")
        t = time.time()
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if proc.returncode != 0:
            raise StepFailed(f"step {self.step_no} ({name}) failed with exit status {proc.returncode}: {shown}")
        self.say(f"step {self.step_no}: {name}: finished in {time.time() - t:.0f}s")

    def cache(self, label: str) -> Path:
        return self.cache_dir / self.upstreams[label]

    def head_options(self) -> List[str]:
        seeds = (["--seeds", ",".join(map(str, self.c.seeds))] if self.c.seeds
                 else ["--set", f"seed={self.c.seed}"])
        opts = ["--n-jobs", str(self.c.n_jobs), *seeds, "--set", f"device={self._device()}"]
        epochs = self.c.epochs if self.c.epochs is not None else (20 if self.c.demo else None)
        if epochs is not None:
            opts += ["--set", f"epochs={epochs}"]
        if self.c.batch_size is not None:
            opts += ["--set", f"batch_size={self.c.batch_size}"]
        if self.c.demo:
            # 217 training clips: a narrower, less dropped-out classifier learns more reliably
            # than the real corpus's hidden=1024, dropout=0.5 (WCE on demo-wavlm: dev macro-F1
            # 0.23-0.25 over seeds, against 0.17-0.25).
            opts += ["--set", "hidden=256", "--set", "dropout=0.2"]
        return opts + self.quiet()

    def quiet(self) -> List[str]:
        """``--quiet`` for a step's command when the study is quiet: steps show their progress
        bars (epochs of every grid pass, clips extracted) unless ``./run_all.sh --quiet``."""
        return ["--quiet"] if self.c.quiet else []

    def _device(self) -> str:
        return self.c.device

    def grid(self, name: str, out: Path, *, preset: Optional[str] = None, spec: Optional[dict] = None,
             cache: Optional[Path] = None) -> None:
        argv = ["train-grid", "--out", out, *self.head_options()]
        if preset:
            argv += ["--preset", preset]
        if spec is not None:
            out.mkdir(parents=True, exist_ok=True)
            spec_path = out / "spec.json"
            write_json(spec_path, spec)
            argv += ["--spec", spec_path]
        if cache is not None:
            argv += ["--cache", cache]
        self.run(name, argv)

    def extract(self, name: str, upstream, out: Path, extra: Sequence, *, random_init: Optional[bool] = None) -> None:
        """One extract-features step (last layer; resumed or reused by extract-features itself).

        ``random_init`` (default: on the demo corpus) builds the upstream with seeded random
        weights; a model directory written by finetune-best carries its own weights.
        """
        c = self.c
        argv = ["extract-features", "--corpus", self.corpus, "--upstream", upstream, "--out", out,
                "--layers", "last", "--device", c.device, "--seed", c.seed, *extra]
        if c.demo if random_init is None else random_init:
            argv += ["--random-init"]
        argv += self.quiet()
        if c.batch_seconds:
            argv += ["--batch-seconds", c.batch_seconds]
        argv += self._corpus_flags()
        self.run(name, argv)

    @staticmethod
    def dev_f1(run_dir: Path) -> float:
        return float(RunDir(run_dir).metrics()["f1_macro"])

    def head(self, grid: Path, name: str) -> Path:
        """The run of a head configuration that the later steps use (thresholds, ensembles,
        fine-tuning's warm start): ``grid/name``, or with ``--seeds`` the first seed's run."""
        return grid / (f"{name}-seed{self.c.seeds[0]}" if self.c.seeds else name)

    def seed_runs(self, grid: Path, name: str) -> List[Path]:
        """Every seed's run of a head configuration (one without ``--seeds``)."""
        return [grid / f"{name}-seed{s}" for s in self.c.seeds] if self.c.seeds else [grid / name]

    def mean_dev_f1(self, grid: Path, name: str) -> float:
        """A configuration's development macro-F1, averaged over its seeds."""
        runs = self.seed_runs(grid, name)
        return sum(self.dev_f1(r) for r in runs) / len(runs)

    def row(self, grid: Path, name: str):
        """A head configuration's report-spec row: its run, with ``--seeds`` also every seed's
        (``{"run": first seed, "seeds": [...]}``; the report shows their mean ± sd)."""
        if not self.c.seeds:
            return str(grid / name)
        return {"run": str(self.head(grid, name)), "seeds": [str(r) for r in self.seed_runs(grid, name)]}

    def ensembles(self, members: Sequence[Path]) -> Dict[str, Path]:
        """Section 3.6: the members' mean probabilities, unweighted and weighted by each
        member's development macro-F1 (the paper reports both without saying its weights)."""
        ens = self.runs / "ensemble"
        self.run("ensemble the three best upstreams, WBCE(P) (section 3.6)",
                 ["conilium-eval", "ensemble", *members, "--out", ens], skip_if=RunDir(ens).metrics_path)
        weighted = self.runs / "ensemble-weighted"
        weights = ",".join(f"{max(self.dev_f1(m), 1e-3):.4f}" for m in members)
        self.run("weighted ensemble of the same runs, weights = their development macro-F1 (section 3.6)",
                 ["conilium-eval", "ensemble", *members, "--weights", weights, "--out", weighted],
                 skip_if=RunDir(weighted).metrics_path)
        return {"Ensemble": ens, "Ensemble (weighted)": weighted}

    def lora_model(self) -> Path:
        return self.results.models / "finetuned-lora"

    def frozen_then_finetuned(self, model: Path) -> Optional[Path]:
        """The design card's loop: features of the fine-tuned upstream (``extract-features
        --upstream MODEL_DIR``), then Table 2's heads on them; returns the grid's folder."""
        if not ModelDir(model).is_model():
            return None
        cache = self.cache_dir / f"finetuned-{self.upstreams['WavLM-large']}"
        self.extract(f"extract features of the fine-tuned upstream ({model.name})", model, cache, [],
                     random_init=False)
        out = self.runs / "table2-finetuned"
        self.grid("train heads: Table 2 on the fine-tuned upstream's features", out, preset="table2", cache=cache)
        return out

    # ------------------------------------------------------------------ the study
    def execute(self) -> Path:
        c = self.c
        self.out.mkdir(parents=True, exist_ok=True)
        self.results.write_settings(asdict(c))
        self.say(f"study on {'the demo corpus' if c.demo else self.corpus}; results in {self.out}")
        self.corpus_steps()
        noisy = self.feature_caches()
        t1 = self.table1(noisy)
        self.frozen_heads(self.cache("WavLM-large"))
        modalities = self.text_heads(self.cache("WavLM-large"))

        best = self.head(self.runs / "table2", "wbce-S")
        tuned = self.runs / "best-tuned"
        self.run("adjust decision thresholds of WBCE(S) (section 3.7)",
                 ["conilium-eval", "tune-thresholds", best, tuned], skip_if=RunDir(tuned).metrics_path)
        ens, ed = self.best_upstreams(t1)

        model = self.results.models / "finetuned"
        t2_finetuned = None if c.skip_finetune else self.end_to_end(model, best)
        test_split = self._unlabelled_split()
        if test_split:
            sub = self.out / f"submission_{test_split}.csv"
            self.run(f"challenge-style submission of the tuned WBCE(S) run on {test_split}",
                     ["conilium-eval", "submission", tuned, "--split", test_split, "--out", sub], skip_if=sub)
        return self.report(self._report_spec(t1, tuned, ens, ed, model, t2_finetuned, modalities))

    def corpus_steps(self) -> None:
        """The demo corpus (when no corpus is given), then the corpus description."""
        c = self.c
        if c.demo:
            self.run("make the demo corpus", ["make-demo-corpus", "--out", self.corpus, "--clips", c.demo_clips,
                                              "--seed", c.seed, "--noise-out", self.noise],
                     skip_if=self.corpus / "Labels" / "labels_consensus.csv")
        self.run("describe the corpus (Figures 1 and 3)",
                 ["describe-corpus", "--corpus", self.corpus, "--out", self.out / "corpus",
                  *self._corpus_flags()],
                 skip_if=self.out / "corpus" / "summary.json")

    def feature_caches(self) -> Optional[Path]:
        """Every upstream's cache, and the noise-augmented one when there is noise (its path)."""
        for label, name in self.upstreams.items():
            self.extract(f"extract features: {label} ({name})", name, self.cache(label), ["--pooled-stats"])
        for label, name in self.beyond.items():  # the encoder's own 30 s input, no waveform normalisation
            self.extract(f"extract features: {label} ({name}), beyond the paper", name, self.cache_dir / name, [])

        # Section 3.2: MUSAN-style noise mixed into 80 % of the Train clips, for Wav2vec2-base
        # (the one upstream the paper saw it help); the noisy copies live in their own cache.
        if self.noise is None:
            return None
        noisy = self.cache_dir / f"{self.upstreams['Wav2vec2-base']}-noise"
        self.extract("extract features with noise augmentation: Wav2vec2-base (section 3.2)",
                     self.upstreams["Wav2vec2-base"], noisy,
                     ["--augment-noise", self.noise, "--augment-fraction", "0.8", "--snr-db", "5:20", "--copies", "1"])
        return noisy

    def table1(self, noisy: Optional[Path]) -> Path:
        """Table 1 and the WBCE(P) runs of each upstream (for the ensemble and Easy/Difficult)."""
        t1 = self.runs / "table1"
        spec = {"description": "Table 1 (WCE on hard labels per upstream) and WBCE(P) per upstream (section 3.6)",
                "runs": []}
        for label, name in self.upstreams.items():
            spec["runs"].append({"name": f"{name}-wce-hard", "cache": str(self.cache(label)), "loss": "wce", "labels": "hard"})
            spec["runs"].append({"name": f"{name}-wbce-P", "cache": str(self.cache(label)), "loss": "wbce", "labels": "P"})
        if noisy is not None:
            spec["runs"].append({"name": f"{self.upstreams['Wav2vec2-base']}-noise-wce-hard", "cache": str(noisy),
                                 "loss": "wce", "labels": "hard"})
        for name in self.beyond.values():
            spec["runs"].append({"name": f"{name}-wce-hard", "cache": str(self.cache_dir / name), "loss": "wce",
                                 "labels": "hard"})
        self.grid("train heads: Table 1 (upstreams) and WBCE(P) per upstream", t1, spec=spec)
        return t1

    def frozen_heads(self, best_cache: Path) -> None:
        """Table 2, the sampler runs, Table 3 and the runs beyond the paper, on the best upstream's cache."""
        self.grid("train heads: Table 2 (losses and targets)", self.runs / "table2", preset="table2", cache=best_cache)
        self.grid("train heads: section 3.4 (class-balanced sampler)", self.runs / "sampler", preset="sampler", cache=best_cache)
        self.grid("train heads: Table 3 (high-agreement subsets)", self.runs / "table3", preset="table3", cache=best_cache)
        if not self.c.paper_only:
            self.grid("train heads: arousal/valence/dominance, alone and with WBCE(S); WBCE(S) on X and O clips too",
                      self.runs / "extra", spec=EXTRA_SPEC, cache=best_cache)

    def text_heads(self, audio_cache: Path) -> Optional[Path]:
        """Beyond the paper: the transcripts' text upstream (roberta-large; the demo: demo-text
        with random weights) into its own cache, then WBCE(S) on the text alone and on audio +
        text (a concat and a cross-attention fusion head); returns the grid's folder (None when
        the rows are left out: ``--paper-only``, or a corpus without transcripts)."""
        if self.c.paper_only:
            return None
        if not self.c.demo:
            from conilium.corpus import load_corpus

            corpus = load_corpus(self.corpus, read_durations=False, allow_symlinks=self.c.allow_symlinks)
            transcripts = corpus.transcripts()
            if transcripts.missing:  # a fusion head needs every clip's text: no rows rather than a failed study
                self.say(f"{transcripts.missing_summary()}: the text and audio + text rows are left out "
                         f"(conilium corpus transcribe --asr whisper-large-v3 makes the transcripts)")
                return None
        name = TEXT_UPSTREAM[1] if self.c.demo else TEXT_UPSTREAM[0]
        text_cache = self.cache_dir / name
        self.extract(f"extract features: the transcripts' text ({name}), beyond the paper", name, text_cache, [])
        out = self.runs / "modalities"
        spec = {"description": "beyond the paper: WBCE(S) on the transcripts' text alone and fused with the audio",
                "common": {"loss": "wbce", "labels": "S"}, "runs": []}
        for label, (run, extra) in MODALITY_ROWS.items():
            if run.startswith("text-"):
                spec["runs"].append({"name": run, "cache": str(text_cache)})
            else:
                spec["runs"].append({"name": run, "cache": str(audio_cache), "more_caches": [str(text_cache)],
                                     **extra})
        self.grid("train heads: WBCE(S) on the text, and on audio + text (beyond the paper)", out, spec=spec)
        return out

    def best_upstreams(self, t1: Path) -> Tuple[Dict[str, Path], Path]:
        """The three best upstreams by Table 1: their WBCE(P) runs' ensembles and the Easy/Difficult
        analysis; returns the ensembles and the analysis folder."""
        ranked = sorted(self.upstreams, key=lambda lab: -self.mean_dev_f1(t1, f"{self.upstreams[lab]}-wce-hard"))
        top3 = ranked[:3]
        members = [self.head(t1, f"{self.upstreams[lab]}-wbce-P") for lab in top3]
        self.say(f"three best upstreams by Table 1: {', '.join(top3)}")
        ens = self.ensembles(members)
        ed = self.out / "easy_difficult"
        self.run("Easy/Difficult analysis (section 4)",
                 ["conilium-eval", "easy-difficult", *members, "--out", ed], skip_if=ed / "easy_difficult.json")
        return ens, ed

    def end_to_end(self, model: Path, best: Path) -> Optional[Path]:
        """finetune-best into ``model`` (and with LoRA), Table 2's heads on its features, predictions
        on unlabelled files; returns the frozen-then-fine-tuned grid's folder."""
        c = self.c
        # Warm start from the best head of Table 2 (same upstream, same weights): the
        # end-to-end model starts where the frozen-feature head ended. --resume continues
        # an interrupted fine-tuning (and starts afresh when none was begun).
        argv = ["finetune-best", "--corpus", self.corpus, "--out", model, "--upstream", self.upstreams["WavLM-large"],
                "--device", c.device, "--seed", c.seed, "--init-head", best, "--resume"]
        if c.demo:
            argv += ["--random-init", "--random-init-seed", c.seed, "--epochs", c.finetune_epochs or 2,
                     "--lr", "1e-4", "--max-train-clips", "160"]
        elif c.finetune_epochs:
            argv += ["--epochs", c.finetune_epochs]
        argv += self.quiet()
        if c.finetune_batch_size:
            argv += ["--batch-size", c.finetune_batch_size]
        if c.allow_symlinks:
            argv += ["--allow-symlinks"]
        self.run("fine-tune the best configuration end to end (finetune-best)", argv,
                 skip_if=ModelDir(model).marker_path)
        if not c.paper_only:  # the same recipe with LoRA adapters instead of the whole transformer
            lora = self.lora_model()
            self.run("the same fine-tuning with LoRA adapters (rank 8), beyond the paper",
                     [*argv[:argv.index("--out") + 1], lora, *argv[argv.index("--out") + 2:], "--lora-rank", 8],
                     skip_if=ModelDir(lora).marker_path)
        t2_finetuned = self.frozen_then_finetuned(model)
        test_split = self._unlabelled_split()
        if test_split:
            files = self._split_files(test_split)[:8]
            self.run(f"predict {len(files)} {test_split} files with the fine-tuned model",
                     ["predict", "--model", model, *files, "--out", self.out / "predictions_finetuned.csv", *self.quiet()],
                     skip_if=self.out / "predictions_finetuned.csv")
        return t2_finetuned

    def report(self, report_spec: dict) -> Path:
        """REPORT.md from ``report_spec``, with every step of the study appended as a recipe."""
        self.results.write_spec(report_spec)
        self.run("write the report", ["conilium-eval", "report", self.results.spec_path, "--out", self.out])
        report = self.results.report_path
        recipe = ("\n## How these results were made\n\nEvery step of `run_all.sh`, in order "
                  "(reused steps were complete from an earlier run):\n\n```bash\n" + "\n".join(self.log) + "\n```\n")
        text = report.read_text(encoding="utf-8")
        with atomic_path(report, suffix=".md.tmp") as tmp:
            tmp.write_text(text + recipe, encoding="utf-8")
        self.say(f"done: {report}")
        return report

    # ------------------------------------------------------------------ helpers
    def _corpus_flags(self) -> List[str]:
        """Options of the steps that read the corpus's audio (extract-features, describe-corpus)."""
        return (["--skip-bad"] if self.c.skip_bad else []) + (["--allow-symlinks"] if self.c.allow_symlinks else [])

    def _labelled_splits(self) -> Dict[str, bool]:
        from conilium.corpus import load_corpus

        corpus = load_corpus(self.corpus, read_durations=False, allow_symlinks=self.c.allow_symlinks)
        out: Dict[str, bool] = {}
        for clip in corpus:
            out[clip.split] = out.get(clip.split, False) or clip.emo_class is not None
        return out

    def _unlabelled_split(self) -> Optional[str]:
        for split, labelled in self._labelled_splits().items():
            if not labelled:
                return split
        return None

    def _split_files(self, split: str) -> List[str]:
        from conilium.corpus import load_corpus

        corpus = load_corpus(self.corpus, read_durations=False, splits=[split],
                             allow_symlinks=self.c.allow_symlinks)
        return [str(corpus.audio_path(c.name)) for c in corpus]

    def _report_spec(self, t1: Path, tuned: Path, ens: Dict[str, Path], ed: Path, model: Path,
                     t2_finetuned: Optional[Path] = None, modalities: Optional[Path] = None) -> dict:
        tables = {
            "table1": {label: self.row(t1, f"{name}-wce-hard") for label, name in self.upstreams.items()},
            "table2": {**{label: self.row(self.runs / "table2", d) for label, d in TABLE2_ROWS.items()},
                       **({} if self.c.paper_only else {XO_ROW[0]: self.row(self.runs / "extra", XO_ROW[1])})},
            # the sampler section compares with the Table 2 runs without a sampler
            "sampler": {"WBCE(P)": self.row(self.runs / "table2", "wbce-P"),
                        "KLD(S)": self.row(self.runs / "table2", "kld-S"),
                        **{label: self.row(self.runs / "sampler", d) for label, d in SAMPLER_ROWS.items()}},
            "table3": {label: self.row(self.runs / "table3", d) for label, d in TABLE3_ROWS.items()},
            "ensemble": {label: str(path) for label, path in ens.items()},
            # the paper's "baseline system" (WavLM + attentive pooling + WCE on hard labels, the
            # challenge baseline's configuration) is Table 1's WavLM row, here as a head on
            # frozen features; the report says so in its Setting column
            "attributes": {} if self.c.paper_only else {label: self.row(self.runs / "extra", d)
                                                        for label, d in ATTRIBUTE_ROWS.items()},
            "table4": {"dev": str(tuned),
                       "Baseline (Development)": self.row(t1, f"{self.upstreams['WavLM-large']}-wce-hard")},
        }
        if modalities is not None:
            tables["table2"].update({f"{label} (beyond the paper)": self.row(modalities, run)
                                     for label, (run, _) in MODALITY_ROWS.items()})
        if t2_finetuned is not None:
            tables["table2_finetuned"] = {label: self.row(t2_finetuned, d) for label, d in TABLE2_ROWS.items()}
        noisy = f"{self.upstreams['Wav2vec2-base']}-noise-wce-hard"
        if RunDir(self.head(t1, noisy)).is_complete():
            tables["table1"]["Wav2vec2-base + noise"] = self.row(t1, noisy)
        for label, name in self.beyond.items():  # not among the paper's upstreams: no paper number, no finding
            tables["table1"][f"{label} (beyond the paper)"] = self.row(t1, f"{name}-wce-hard")
        if RunDir(model / "tuned").is_complete():
            tables["table4"]["finetune-best, end to end, thresholds adjusted (Development)"] = str(model / "tuned")
        lora = self.lora_model()
        if not self.c.paper_only and RunDir(lora / "tuned").is_complete():
            tables["table4"]["finetune-best with LoRA rank 8 (beyond the paper), thresholds adjusted "
                             "(Development)"] = str(lora / "tuned")
        labelled_tests = [s for s, lab in self._labelled_splits().items() if lab and s not in ("Train", "Development")]
        if labelled_tests:
            tables["table4"]["test"] = {"run": str(tuned), "split": labelled_tests[0]}
        kind = "demo corpus, small random-weight upstreams" if self.c.demo else str(self.corpus)
        return {"title": f"CONILIUM study ({kind})", "corpus_figures": str(self.out / "corpus"),
                "tables": tables, "easy_difficult": str(ed)}


def run_study(config: StudyConfig) -> Path:
    return Study(config).execute()
