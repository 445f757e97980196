"""Frozen item content for the plugin's models (sequential and general): features extracted on first use and read by
item token, the image check, and the checkpoint's record of the feature files a model was trained on.

:class:`ContentMixin` goes before RecBole's recommender class (``class M(ContentMixin, SequentialRecommender)``);
the model calls :meth:`ContentMixin.init_content` in ``__init__`` after ``super().__init__``.
"""

from __future__ import annotations

import os

from recbole_mm.utils import ThreadFlag, cfg_get, preserved_rng

_RESTORING = ThreadFlag()


def restoring_checkpoint():
    """Models built inside this block are about to receive a checkpoint's weights (``load_data_and_model``): they
    skip initialising weights from elsewhere (PMMRec's transfer from ``pretrained_path``), which the checkpoint
    replaces anyway and which may no longer be on disk, and do not replace frozen features made stale by a
    re-conversion (the checkpoint was trained on them: :meth:`ContentMixin.frozen_features` raises instead)."""
    return _RESTORING.on()


def is_restoring_checkpoint() -> bool:
    return bool(_RESTORING)


class FeatureMismatchError(ValueError):
    """A checkpoint loaded onto frozen features other than those it was trained on."""


class ContentMixin:
    """``self.content`` (the dataset's :class:`~recbole_mm.data.content.ItemContent`), :meth:`frozen_features`,
    :meth:`require_images` and the feature fingerprints saved with checkpoints."""

    def init_content(self, config, dataset) -> None:
        self.content = dataset.item_content
        self.show_progress = bool(cfg_get(config, "show_progress", False))
        self._feature_fingerprints: dict = {}  # path -> fingerprint of each frozen feature file read (frozen_features)

    def frozen_features(self, config, dataset, modality: str, kind: str = "pooled", taps=None, as_stored: bool = False):
        """Frozen features of ``modality`` (``text`` | ``image``; any name, e.g. ``audio``, read from
        ``<modality>_feature_file``, a token-keyed feature file with its sidecar, as the converters write) aligned to internal ids (row 0 zeros), extracted
        on first use with the run's encoder keys and cached in the dataset folder. ``kind="pooled"``: a tensor
        ``[n_items, d]``; ``kind="tokens"`` / ``"taps"`` (hidden-state indices ``taps``, all when ``None``): a
        :class:`~recbole_mm.data.content.FeatureLookup` over the memory map ``[n, T, d]`` (stored as
        ``token_feature_dtype``, float16 by default). Pooled features are stored as ``feature_dtype``; the tensor
        is float32 unless ``as_stored`` (then it keeps that dtype: a float16 buffer takes half the memory, for
        consumers that cast the rows they read, like :class:`~recbole_mm.layers.towers.FeatureTower`)."""

        from recbole_mm.extract import default_feature_path, get_or_extract, spec_from_config

        given = cfg_get(config, f"{modality}_feature_file")
        if given and kind == "pooled":  # a feature file made elsewhere (MMRec's image / text / audio features)
            path = given if os.path.isabs(given) else os.path.join(dataset.dataset_path, given)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{modality}_feature_file {given!r}: no such file ({path})")
            return self._record(path, self.content.features(path, dtype=self._pooled_dtype(config, as_stored)))
        if modality not in ("text", "image"):
            raise ValueError(f"{modality} features come from a file: set {modality}_feature_file (e.g. "
                             f"features/mmrec/{modality}.npy of a converted MMRec folder)")
        spec = spec_from_config(config, modality, kind=kind, taps=taps)
        if kind in ("tokens", "taps"):
            spec.dtype = cfg_get(config, "token_feature_dtype", "float16")
        if modality == "image" and not os.path.isfile(
                default_feature_path(dataset.dataset_path, spec, cfg_get(config, "features_dir"))):
            self.require_images()
        with preserved_rng():  # extracting on first use must not change this model's initial weights
            # loading a checkpoint: features from other inputs are an error, not replaced (the checkpoint needs them)
            path = get_or_extract(config, dataset.dataset_path, dataset.dataset_name, spec, progress=self.show_progress,
                                  replace_stale=not is_restoring_checkpoint())
        if kind in ("tokens", "taps"):
            features = self.content.feature_lookup(path)
        else:
            features = self.content.features(path, dtype=self._pooled_dtype(config, as_stored))
        return self._record(path, features)

    @staticmethod
    def _pooled_dtype(config, as_stored: bool):
        import numpy as np

        return np.dtype(cfg_get(config, "feature_dtype", "float32") if as_stored else "float32")

    def _record(self, path: str, features):
        # this model's own record (the content object is shared by every model built on the dataset)
        self._feature_fingerprints[os.path.abspath(path)] = dict(self.content.loaded_feature_fingerprints[
            os.path.abspath(path)])
        return features

    def require_images(self) -> None:
        """A model that reads images on a dataset without any is an error (not a catalogue of placeholders)."""
        if self.content.count_images() == 0:
            raise ValueError(
                f"{type(self).__name__} reads item images (modality {getattr(self, 'modality', 'image')!r}), but no item "
                f"of dataset {self.content.dataset_name} has an image in {self.content.image_dir()}: use modality "
                "text, or put <item_token>.jpg files there (image_dir)")

    # ------------------------------------------------------------ checkpoints
    FEATURES_KEY = "recbole_mm_features"

    def feature_fingerprints(self) -> dict:
        """``{"<encoder folder>/<file>": fingerprint}`` of the frozen feature files this model was built on."""
        return {"/".join(os.path.normpath(p).split(os.sep)[-2:]): dict(fp) for p, fp in self._feature_fingerprints.items()}

    def other_parameter(self):
        """RecBole saves this in checkpoints: also the fingerprints of the features the model was trained on."""
        out = dict(super().other_parameter() or {})
        out[self.FEATURES_KEY] = self.feature_fingerprints()
        return out

    def load_other_parameter(self, para):
        """Loading a checkpoint onto features other than those it was trained on is an error (not a silent
        mismatch): a re-extracted, permuted or replaced feature file changes its sha256."""
        para = dict(para or {})
        saved = para.pop(self.FEATURES_KEY, None)
        if saved:
            now = self.feature_fingerprints()
            for name, fp in saved.items():
                have = now.get(name)
                if have is None or have.get("sha256") != fp.get("sha256"):
                    raise FeatureMismatchError(
                        f"this checkpoint was trained on the features {name} (sha256 {str(fp.get('sha256'))[:12]}..., "
                        f"shape {fp.get('shape')}), but the model now reads "
                        + (f"sha256 {str(have.get('sha256'))[:12]}..." if have else "no such file")
                        + ": restore that feature file (same encoder and settings) or retrain on the current one")
        super().load_other_parameter(para or None)
