"""A per-scan intensity model on the label transfer's prior: the scan's own intensities finish the
boundaries that the registered atlas placed.

Label transfer puts every boundary where the atlas lands, and the scan's intensities never get a
say: a cortex/CSF or grey/white edge that the registration missed by a voxel stays missed. The
classic remedy is Bayesian segmentation with an atlas prior and a Gaussian intensity model fitted
to each scan by EM (Van Leemput et al., IEEE TMI 1999; SPM's unified segmentation, Ashburner &
Friston, NeuroImage 2005; FreeSurfer's SAMSEG, Puonti, Iglesias & Van Leemput, NeuroImage 2016).
SAMSEG needs a probabilistic atlas built from many labelled subjects and deformed to the scan; the
label transfer gives one per scan:

    prior       π_l(v): the transfer's labels as soft maps (one atlas: its labels one-hot; several:
                each atlas's label weighted by its fusion weight, so where the atlases disagree the
                prior does too), smoothed by a Gaussian of ``prior_sigma_mm``.
    likelihood  N(x_v; μ_l, σ_l²): one Gaussian per structure, label 0 inside the brain included
                (the sulcal CSF, vessels and dura an atlas leaves unlabelled).
    posterior   p(l | x_v) ∝ π_l(v)^β N(x_v; μ_l, σ_l²); a voxel's label is its argmax.
    EM          the Gaussians start from the transfer's labels; ``iterations`` E- and M-steps.

What was taken from SAMSEG and what was left. The settings below were chosen on the validation
sets by ``python -m bench.intensity --variants ...`` (bench/results/intensity.md, which lists
each variant's Dice):
- taken: the atlas prior times a Gaussian likelihood fitted per scan by EM. Left: a variance per
  structure (SAMSEG's, with inverse-Wishart priors): here one variance is shared by every
  structure (``variance`` "shared": the pooled within-structure variance, re-estimated at each
  M-step), so a boundary falls between two structures' means where the prior puts it, not
  where a broad Gaussian's tail outweighs a narrow one's. With a variance per structure (even
  pulled toward each structure's variance under the transfer's labels, ``per_structure``) the
  heterogeneous cortex took partial-volume voxels from the white matter, the pallidum of
  FreeSurfer-normalised scans (a few intensity values) narrowed onto a spike and lost to its
  neighbours, and deep grey structures lost up to 0.005 Dice; shared, none lost any on the
  validation sets.
- β = ``prior_weight`` 2 with one atlas (the prior squared): at β = 1 deep grey structures whose
  intensities overlap (thalamus, ventral DC, pallidum) lose to their neighbours. Several atlases
  make a better prior (joint label fusion of five: Dice 0.875 against 0.793), and where they
  agree the intensities should move it less: β grows by ``prior_weight_per_atlas`` (0.5) with
  each further atlas, 4 with five; at 2 the pallidum and 3rd ventricle lost 0.02-0.03 there.
- left (tried while the model was designed, not kept, so no command reruns them): SAMSEG's classes
  shared by structures named alike (white matter, grey matter, CSF, putamen, pallidum; within a
  class the prior alone decides) and a mixture of three Gaussians for label 0 each moved the mean
  Dice by under 0.001; a Gaussian per structure works for any labelling protocol. A bias field
  in the EM: the product corrects bias before (N4 for heads, ``--bias_correction``), and N4 on
  the MICCAI scans before the model moved their Dice by under 0.001. SAMSEG's mesh deformation:
  the registration has placed the prior already.

Cost. Only voxels whose prior is not certain (within the smoothing's reach of another label)
enter the EM, as rows of the few labels their prior holds (``slots``); the rest keep their label
and add fixed sums to the M-step. The M-step reads every ``fit_stride``-th uncertain voxel, the last
E-step all of them. Everything is NumPy/SciPy on one thread except the smoothing (two threads,
one structure each: the same numbers whatever the order), so the result is bit-identical between
runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ltnet_tf.config import ConfigError
from ltnet_tf.labelling.prior import TransferPrior

MODES = ("auto", "off")
# Intensities are binned into this many levels for the EM (a table of each Gaussian's log-likelihood
# per level replaces per-voxel arithmetic); 1/4096 of the range is far below any structure's spread.
LEVELS = 4096
# EM has not converged when more than this share of its voxels change label in its last iteration
# (on the validation scans, under 0.01 % did by the 5th).
UNSETTLED = 0.01
SETTLED = 0.001  # ... and has converged when fewer do: it stops there
# The M-step reads every ``fit_stride``-th uncertain voxel, but at least this many.
MIN_SAMPLE = 50_000
# Structures that collapse (under a third of their transferred volume) are given their transferred
# labels back; when they hold more than this share of the brain, the EM failed: all are kept.
COLLAPSE_SHARE = 0.05


@dataclass(frozen=True)
class IntensityModelSettings:
    """The model as predict.py runs it (``--intensity_model``); recorded in prediction.json."""
    prior_weight: float = 1.5             # β with one atlas: posterior ∝ prior^β × likelihood
    prior_weight_per_atlas: float = 0.625  # ... plus this for each further atlas (4 with five)
    prior_sigma_mm: float = 1.0           # the Gaussian that smooths the transferred labels
    truncate: float = 2.5                 # ... cut at this many sigmas
    iterations: int = 20                  # EM iterations at most (it stops once settled)
    variance: str = "shared"              # one variance for all structures, or "per_structure":
    variance_anchor: float = 0.5          # ... each (EM's + κ × the transfer's) / (1 + κ)
    fit_stride: int = 16                  # the M-step reads every k-th uncertain voxel
    slots: int = 4                        # labels a voxel's prior holds at most (the largest)
    prior_floor: float = 0.01             # a smaller prior is none: its label is no candidate

    def validate(self) -> "IntensityModelSettings":
        for name in ("prior_weight", "prior_sigma_mm", "truncate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"intensity model: '{name}' must be a finite number > 0, got "
                                  f"{value!r}")
        for name in ("iterations", "fit_stride", "slots"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"intensity model: '{name}' must be an integer >= 1, got "
                                  f"{getattr(self, name)!r}")
        if self.variance not in ("shared", "per_structure"):
            raise ConfigError(f"intensity model: 'variance' must be shared or per_structure, got "
                              f"{self.variance!r}")
        for name in ("variance_anchor", "prior_weight_per_atlas"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"intensity model: '{name}' must be a number >= 0, got "
                                  f"{value!r}")
        return self

    def replace(self, **changes) -> "IntensityModelSettings":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class IntensityResult:
    """``labels`` [*grid] int32 (the transfer's where the model was not applied); ``probabilities``
    [L, *grid] uint8 (×255) posterior of each wanted label, or None; ``record`` what happened, for
    prediction.json: 'applied', 'changed_fraction' (of the brain's voxels), 'uncertain_fraction',
    'warning' (why the transfer's labels were kept, or None)."""
    labels: np.ndarray
    probabilities: Optional[np.ndarray]
    record: dict


class IntensityModel:
    """The per-scan intensity model (see the module docstring).

    ``__call__(values, mask, labels, spacing_mm, votes=None, probabilities=None)``:
        values: [D, H, W] float32, the scan's intensities normalised once per scan
            (``io.intensity.normalize_array``: tissue in [0, 1], background and artefacts 0).
        mask: [D, H, W] bool, the voxels that may be labelled (the brain), or None (every voxel).
        labels: [D, H, W] int32 label IDs, the transfer's answer (one atlas, or the fusion of
            several); the prior's centre.
        spacing_mm: the grid's voxel sizes (3,), mm: the prior is smoothed in mm.
        votes: several atlases: (flat voxel indices [N], each atlas's label there [A, N], its
            fusion weight there [A, N] or None for equal weights); voxels not listed take
            ``labels`` as every atlas's. None: ``labels`` is the prior's one source.
        probabilities: label IDs whose posterior to return as well (None: none).
    Returns an ``IntensityResult``. The transfer's labels are kept, with the reason in
    ``record['warning']``, when the brain's intensities are flat or the EM fails (a non-finite
    parameter, or a structure's volume collapsing to under a third of the transfer's).
    """

    def __init__(self, settings: IntensityModelSettings = None):
        self.settings = (settings or IntensityModelSettings()).validate()

    def __call__(self, values: np.ndarray, mask: Optional[np.ndarray], labels: np.ndarray,
                 spacing_mm, votes=None, probabilities=None) -> IntensityResult:
        labels = np.asarray(labels)
        mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
        settings = self.settings
        prior = TransferPrior.build(labels, mask, spacing_mm, sigma_mm=settings.prior_sigma_mm,
                                    truncate=settings.truncate, floor=settings.prior_floor,
                                    slots=settings.slots, votes=votes)
        if prior is None:
            return self._kept(labels, probabilities, "no structure inside the brain")
        x = np.asarray(values, np.float32)[prior.box][prior.mask]
        if not x.size or float(x.max() - x.min()) <= 1e-6:
            return self._kept(labels, probabilities, "the brain's intensities are flat")
        atlases = 1 if votes is None else len(votes[1])
        prior_weight = settings.prior_weight + settings.prior_weight_per_atlas * (atlases - 1)
        fit = GaussianFit(x, prior, settings, prior_weight)
        if fit.failure:
            return self._kept(labels, probabilities, fit.failure)
        if fit.last_change is not None and fit.last_change > UNSETTLED:
            return self._kept(labels, probabilities, f"EM did not converge: "
                              f"{100 * fit.last_change:.1f}% of the voxels still changed label "
                              f"in its last iteration")
        score = fit.score()
        choice = prior.own.copy()
        choice[prior.uncertain_voxels] = prior.slot_labels[
            np.arange(len(score)), score.argmax(1)]
        collapsed, warning = self._collapsed(prior, choice)
        if collapsed is None:
            return self._kept(labels, probabilities, warning)
        choice[np.isin(prior.own, collapsed)] = prior.own[np.isin(prior.own, collapsed)]
        result = labels.astype(np.int32)  # a copy: the caller's transfer stays as it was
        result[prior.box][prior.mask] = prior.ids[choice]
        record = {"applied": True, "warning": warning,
                  "changed_fraction": round(float(np.mean(choice != prior.own)), 5),
                  "iterations": fit.iterations, "prior_weight": prior_weight,
                  "uncertain_fraction": round(float(len(prior.uncertain_voxels)
                                                    / max(len(choice), 1)), 4),
                  "gaussians": {int(label): [round(float(m), 4), round(float(s), 4)]
                                for label, m, s in zip(prior.ids, fit.means, fit.sds)}}
        shares = None if probabilities is None else prior.posterior_shares(
            _softmax(score), list(probabilities), labels.shape)
        return IntensityResult(result, shares, record)

    @staticmethod
    def _collapsed(prior, choice) -> tuple:
        """(label indices whose EM volume fell below a third of the transfer's, a warning or
        None), or (None, the reason) when those structures hold over ``COLLAPSE_SHARE`` of the
        brain: a failed EM, not a small structure the scan's intensities do not support."""
        before = np.bincount(prior.own, minlength=len(prior.ids))
        after = np.bincount(choice, minlength=len(prior.ids))
        collapsed = np.flatnonzero((before >= 50) & (3 * after < before))
        if not len(collapsed):
            return collapsed, None
        named = ", ".join(f"{prior.ids[i]} ({before[i]} -> {after[i]} voxels)" for i in collapsed)
        if before[collapsed].sum() > COLLAPSE_SHARE * len(choice):
            return None, f"EM collapsed the structure(s) {named}"
        return collapsed, (f"EM shrank structure(s) {named} below a third of the transfer's "
                           f"volume: their transferred labels are kept")

    def _kept(self, labels, probabilities, reason: str) -> IntensityResult:
        shares = None
        if probabilities is not None:
            wanted = np.asarray(list(probabilities))
            shares = (255 * (labels[None] == wanted.reshape(-1, 1, 1, 1))).astype(np.uint8)
        return IntensityResult(labels.astype(np.int32, copy=False), shares,
                               {"applied": False, "warning": reason, "changed_fraction": 0.0})


# ------------------------------------------------------------------------------------ the EM
class GaussianFit:
    """EM of the Gaussians on intensities ``x`` [M] of the modelled voxels of ``prior``.

    Intensities are binned into ``LEVELS`` levels across their range, once: an E-step is then a
    look-up of each slot's log-likelihood in a [L, LEVELS] table, and an M-step one weighted
    histogram per structure. ``score()`` gives the log posterior (unnormalised) of every slot of
    the uncertain voxels; ``failure`` is why EM failed (None if it did not)."""

    def __init__(self, x: np.ndarray, prior: TransferPrior, settings: IntensityModelSettings,
                 prior_weight: float):
        count, self.prior = len(prior.ids), prior
        low, high = float(x.min()), float(x.max())
        self.levels = np.linspace(low, high, LEVELS)
        level = np.rint((x - low) * ((LEVELS - 1) / (high - low))).astype(np.int64)
        certain = np.ones(len(x), bool)
        certain[prior.uncertain_voxels] = False
        fixed = np.bincount(prior.own[certain].astype(np.int64) * LEVELS + level[certain],
                            minlength=count * LEVELS).astype(np.float64)
        valid = prior.slot_labels >= 0
        self.index = prior.slot_labels.astype(np.int32)  # in place from here: fewer copies
        np.maximum(self.index, 0, out=self.index)
        self.index *= LEVELS
        self.index += level[prior.uncertain_voxels].astype(np.int32)[:, None]
        self.log_prior = np.maximum(prior.slot_prior, 1e-30)
        np.log(self.log_prior, out=self.log_prior)
        self.log_prior *= prior_weight
        np.putmask(self.log_prior, ~valid, -np.inf)
        # every k-th uncertain voxel, but enough of them on small grids
        sample = slice(None, None, max(1, min(settings.fit_stride, len(self.index) // MIN_SAMPLE)))
        index, log_prior = self.index[sample].ravel(), self.log_prior[sample]
        posterior = np.where(valid[sample], prior.slot_prior[sample], 0.0).ravel()
        self.failure, self.table, self.anchor = None, None, None
        choice, self.last_change, self.iterations = None, None, 0
        for iteration in range(settings.iterations):
            histogram = fixed + sample.step * np.bincount(index, posterior, count * LEVELS)
            if not self._m_step(histogram.reshape(count, LEVELS), settings):
                return
            score = log_prior + self.table[index].reshape(log_prior.shape)
            posterior = _softmax(score).ravel()
            previous, choice = choice, score.argmax(1)
            if previous is not None:  # the share of sampled voxels whose label still changes
                self.last_change = float(np.mean(previous != choice)) if len(choice) else 0.0
                if self.last_change < SETTLED:
                    break
        self.iterations = iteration + 1

    def _m_step(self, histogram: np.ndarray, settings) -> bool:
        """Means and variances from [L, LEVELS] posterior mass, with the variance prior; the
        log-likelihood table. False (``failure`` set) if a number is not finite."""
        n = histogram.sum(1)
        means = histogram @ self.levels / np.maximum(n, 1e-9)
        scatter = np.maximum(histogram @ self.levels ** 2 - n * means ** 2, 0.0)
        floor = (1e-3 * (self.levels[-1] - self.levels[0])) ** 2
        if self.anchor is None:  # each structure's variance under the transfer's labels
            self.anchor = scatter / np.maximum(n, 1e-9)
        if settings.variance == "shared":
            variances = np.full(len(n), max(scatter.sum() / max(n.sum(), 1e-9), floor))
        else:
            kappa = settings.variance_anchor
            variances = np.maximum((scatter / np.maximum(n, 1e-9) + kappa * self.anchor)
                                   / (1.0 + kappa), floor)
        if not (np.all(np.isfinite(means)) and np.all(np.isfinite(variances))):
            self.failure = "EM gave non-finite Gaussians"
            return False
        self.means, self.sds = means, np.sqrt(variances)
        table = -0.5 * ((self.levels[None] - means[:, None]) ** 2 / variances[:, None]
                        + np.log(variances)[:, None])
        self.table = table.astype(np.float32).ravel()
        return True

    def score(self) -> np.ndarray:
        """[U, K] log posterior (up to a constant per voxel) of the uncertain voxels' slots."""
        return self.log_prior + self.table[self.index]


def _softmax(score: np.ndarray) -> np.ndarray:
    """Rows of [n, K] log scores -> probabilities (K is small: column by column is faster)."""
    columns = range(score.shape[1])
    posterior = np.exp(score - np.maximum.reduce([score[:, k] for k in columns])[:, None])
    posterior /= sum(posterior[:, k] for k in columns)[:, None]
    return posterior
