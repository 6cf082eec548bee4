"""What a study trains and measures: sizes, seeds, the theta setups, the controls, the bands.

``StudyConfig`` is checked as a whole before anything is trained (one-line errors naming the
flag). Presets: ``default`` (the full study, ~45 min on 2 cores), ``quick`` (the same pipeline at
toy step counts, for CI: it cannot reach the in-distribution bar, so the bar is off) and ``demo``
(one seed, the paper's 10k -> 500k setup, no controls).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from megatron_kd.config import ConfigError

#: phase-1 theta -> phase-2 theta (the paper's three setups)
SETUPS = {"10k_to_10k": (10_000, 10_000), "500k_to_500k": (500_000, 500_000),
          "10k_to_500k": (10_000, 500_000)}
MAIN_SETUP = "10k_to_500k"  # the setup the controls vary

#: control -> (what it changes, arms it trains). Each is one recipe under recipes/reproduce/.
CONTROLS = {
    "teacher_reset_positions": ("the teacher sees per-document (reset) positions, the student global "
                                "ones: no absolute-position content in the KD targets", ("kd",)),
    "positional_teacher": ("a teacher with a Llama-4-style position-dependent part (NoPE layer with "
                           "attention temperature tuning): absolute position reaches its logits "
                           "under the document mask", ("kd",)),
    "short_teacher": ("a teacher trained only up to the student's document length (its curriculum "
                      "stage at the longest phase-2 document)", ("kd",)),
    "freeze_high_frequencies": ("query/key rows of the high-index (low-frequency) half of the rotary "
                                "frequencies frozen during phase 2", ("kd", "ce")),
    "freeze_low_frequencies": ("query/key rows of the low-index (high-frequency) half frozen during "
                               "phase 2 (the converse)", ("kd", "ce")),
}

BANDS = ("in_distribution", "beyond_document", "beyond_window")


def phase1_arm(theta: int) -> str:
    """The phase-1 arm (and run directory) of a theta: ``phase1_theta10k``."""
    return f"phase1_theta{theta // 1000}k"


@dataclass
class StudyConfig:
    seeds: int = 3
    setups: Tuple[str, ...] = tuple(SETUPS)
    controls: Tuple[str, ...] = tuple(CONTROLS)
    # teacher length curriculum: (seq_length, train_iters, global_batch_size); the last stage is the
    # phase-2 window, the stage at the longest phase-2 document is the short-context teacher
    teacher_stages: Tuple[Tuple[int, int, int], ...] = ((32, 250, 64), (64, 150, 32), (128, 100, 16),
                                                        (256, 100, 16))
    phase1_seq_length: int = 64
    phase1_iters: int = 2000
    phase1_global_batch_size: int = 32
    phase2_seq_length: int = 256
    phase2_iters: int = 100
    phase2_global_batch_size: int = 16
    phase2_doc_tokens: Tuple[int, int] = (16, 129)  # documents of lo..hi-1 tokens (+ EOS)
    passkey_fraction: float = 0.75  # of documents in phase 1 and phase 2
    kd_alpha: float = 0.5
    phase1_docs: int = 24000
    phase2_docs: int = 12000
    # evaluation: needle->question distances per band; in_distribution documents are as long as the
    # longest phase-2 document, beyond_document sequences fill the phase-2 window, beyond_window
    # sequences are twice the window
    distances: Dict[str, Tuple[int, ...]] = field(default_factory=lambda: {
        "in_distribution": (24, 48, 80, 112), "beyond_document": (144, 176, 208, 240),
        "beyond_window": (288, 352, 416, 480)})
    phase1_distances: Tuple[int, ...] = (16, 26, 36, 48)
    samples_per_distance: int = 24
    heldout_lm_seqs: int = 32
    in_distribution_bar: float = 0.8  # phase-1 students must reach it before phase 2 starts
    log_interval: Optional[int] = None  # every run's train.log_interval (None: the recipes')
    # independent runs trained at once, each in its own process with cores / jobs threads: a
    # 0.5M-parameter model does not fill two cores (two 1-thread runs: 1.52x the throughput of
    # one 2-thread run on the 2-core box); 1 = every run in this process, one after the other
    jobs: int = 2
    preset: str = "default"

    # ------------------------------------------------------------------ derived
    @property
    def teacher_length(self) -> int:
        return self.teacher_stages[-1][0]

    def band_length(self, band: str) -> int:
        """Tokens of an evaluation sequence in ``band`` (unpacked, positions 0..n-1)."""
        return {"in_distribution": self.phase2_doc_tokens[1] - 1,
                "beyond_document": self.phase2_seq_length - 1,
                "beyond_window": 2 * self.phase2_seq_length - 1}[band]

    def short_teacher_stage(self) -> int:
        """The curriculum stage used as the short-context teacher: the longest stage not longer
        than the longest phase-2 document."""
        doc = self.phase2_doc_tokens[1]
        fit = [w for w, _, _ in self.teacher_stages if w <= doc]
        if not fit:
            raise ConfigError(f"controls short_teacher: no teacher stage fits the {doc}-token documents")
        return fit[-1]

    def validate(self, max_distance) -> None:
        """``max_distance(n_tokens) -> int``: the largest needle distance a passkey document of
        n tokens holds (passkey.PasskeyGenerator geometry)."""
        if self.seeds < 1:
            raise ConfigError(f"--seeds: expected >= 1, got {self.seeds}")
        bad = [s for s in self.setups if s not in SETUPS]
        if bad or not self.setups:
            raise ConfigError(f"--setups: unknown {bad or 'empty'}; expected a comma-separated subset of "
                              f"{','.join(SETUPS)}")
        bad = [c for c in self.controls if c not in CONTROLS]
        if bad:
            raise ConfigError(f"--controls: unknown {bad}; expected a comma-separated subset of "
                              f"{','.join(CONTROLS)} (or none / all)")
        if self.controls and MAIN_SETUP not in self.setups:
            raise ConfigError(f"--controls vary the {MAIN_SETUP} setup: add it to --setups")
        for name in ("phase1_iters", "phase2_iters", "samples_per_distance", "phase1_seq_length",
                     "phase2_seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs: expected >= 1, got {self.jobs}")
        if not 0.0 <= self.in_distribution_bar <= 1.0:
            raise ConfigError(f"--in-distribution-bar: expected 0..1, got {self.in_distribution_bar}")
        if self.teacher_length != self.phase2_seq_length:
            raise ConfigError(f"teacher stages end at {self.teacher_length} tokens; the teacher is trained "
                              f"at the phase-2 window ({self.phase2_seq_length})")
        lo, hi = self.phase2_doc_tokens
        if not 0 < lo < hi <= self.phase2_seq_length:
            raise ConfigError(f"phase-2 documents of {lo}..{hi - 1} tokens do not fit the "
                              f"{self.phase2_seq_length}-token window")
        for band, lo_d, hi_len in (("in_distribution", 1, self.band_length("in_distribution")),
                                   ("beyond_document", hi, self.band_length("beyond_document")),
                                   ("beyond_window", self.phase2_seq_length, self.band_length("beyond_window"))):
            ds = self.distances.get(band)
            if not ds:
                raise ConfigError(f"--distances-{band.replace('_', '-')}: empty")
            top = max_distance(hi_len)
            for d in ds:
                if d > top:
                    raise ConfigError(f"--distances-{band.replace('_', '-')} {d}: beyond the evaluated length "
                                      f"({hi_len}-token sequences hold distances up to {top})")
                if d < lo_d:
                    raise ConfigError(f"--distances-{band.replace('_', '-')} {d}: not in the band "
                                      f"(expected >= {lo_d} tokens)")
        top = max_distance(self.phase1_seq_length - 1)
        if any(d > top for d in self.phase1_distances):
            raise ConfigError(f"phase-1 probe distances {self.phase1_distances}: beyond the "
                              f"{self.phase1_seq_length - 1}-token documents (up to {top})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "StudyConfig":
        """Inverse of to_dict (JSON turns tuples into lists)."""
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: ({b: tup(d) for b, d in v.items()} if k == "distances" else tup(v)) for k, v in raw.items()})


def preset(name: str) -> StudyConfig:
    if name == "default":
        return StudyConfig()
    if name == "quick":  # the whole pipeline at toy step counts: every arm, both teachers, all bands
        return StudyConfig(
            seeds=2, teacher_stages=((32, 4, 16), (64, 3, 16), (128, 3, 8), (256, 3, 8)),
            phase1_iters=6, phase2_iters=3, phase1_docs=600, phase2_docs=400, samples_per_distance=4,
            heldout_lm_seqs=4, in_distribution_bar=0.0, log_interval=1, jobs=1, preset="quick")
    if name == "demo":  # one seed of the paper's setup, KD vs CE, no controls
        # in this process (jobs=1): its two phase-2 runs gain less than two workers' start-up costs
        return StudyConfig(seeds=1, setups=(MAIN_SETUP,), controls=(), samples_per_distance=64, jobs=1,
                           preset="demo")
    raise ConfigError(f"--preset: expected default|quick|demo, got {name!r}")
