"""The model repository: every ``<root>/<name>/model.onnx``, loaded in the background; a folder
in Triton's layout (``<name>/config.pbtxt`` and version folders) serves its newest version
(`triton_repository.read_model`).

A folder that fails to load (bad graph, bad config) is kept with its reason and reported as not
ready; it never stops the others. Requests for it fail with `ModelFailed` (FAILED_PRECONDITION:
retrying cannot help), while a model still loading answers `ModelNotReady` (UNAVAILABLE: retry).
A graph that loads but cannot be explained (no rule for an op on the gradient path) serves plain
inference (`ServedModel.explain_error`). Model names are the
folder names found at start-up and nothing else: a requested name is only ever looked up in that
table, never joined to a path.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .augment import AugmentError
from .config import ConfigError
from .errors import ModelFailed, ModelNotFound, ModelNotReady, shown
from .model import DEFAULT_MAX_VARIANTS, MODEL_FILE, ServedModel, UnservableModel
from .runtime import RuntimeOptions
from .triton_repository import CONFIG_FILE as TRITON_CONFIG_FILE
from .triton_repository import TritonConfigError, is_triton_folder, read_model

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ModelStatus:
    name: str
    ready: bool
    reason: str = ""


class ModelRepository:
    def __init__(
        self, root: Path, runtime: RuntimeOptions, max_variants: int = DEFAULT_MAX_VARIANTS
    ) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root} is not a directory")
        self.root = root
        self.runtime = runtime
        self.max_variants = max_variants
        self.names = tuple(
            sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        )
        self._models: dict[str, ServedModel] = {}
        self._failures: dict[str, str] = {}
        self._loaded = threading.Event()

    def load_all(self) -> None:
        """Load every folder (blocking); afterwards `loaded` is set."""
        for name in self.names:
            try:
                self._models[name] = self._load(name)
                model = self._models[name]
                if model.explain_error is None:
                    log.info("model %s ready (layer %r, %s)", name, model.default_layer,
                             model.providers[0])
                else:
                    log.info("model %s ready for inference only (%s)", name, model.providers[0])
            except (AugmentError, ConfigError, TritonConfigError, FileNotFoundError,
                    UnservableModel) as error:
                self._failures[name] = self._client_reason(name, error)
                log.error("model %s failed to load: %s", name, error)
            except Exception as error:  # noqa: BLE001 - one bad folder must not stop the rest
                self._failures[name] = f"failed to load ({type(error).__name__})"
                log.exception("model %s failed to load", name)
        self._loaded.set()

    def _client_reason(self, name: str, error: Exception | str) -> str:
        """The error's message for clients: paths of the server's files are shown relative to
        the model folder (the log keeps them whole)."""
        message = str(error)
        for folder in (self.root / name, self.root):
            message = message.replace(f"{folder}{os.sep}", "")
        return message

    def _load(self, name: str) -> ServedModel:
        folder = self.root / name
        if is_triton_folder(folder):
            triton = read_model(folder)
            log.info("model %s: Triton layout, version %d", name, triton.version)
            return ServedModel(name, folder, self.runtime, self.max_variants, triton=triton)
        if not (folder / MODEL_FILE).is_file():
            raise FileNotFoundError(
                f"no {MODEL_FILE} in the model folder (nor a Triton {TRITON_CONFIG_FILE})"
            )
        return ServedModel(name, folder, self.runtime, self.max_variants)

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def ready(self) -> bool:
        """Loading has finished and at least one model serves."""
        return self.loaded and bool(self._models)

    def get(self, name: str) -> ServedModel:
        if name in self._models:
            return self._models[name]
        if name in self._failures:
            raise ModelFailed(f"model {name!r} failed to load: {self._failures[name]}")
        if name in self.names:
            raise ModelNotReady(f"model {name!r} is still loading")
        raise ModelNotFound(f"unknown model {shown(name)}")

    def statuses(self) -> list[ModelStatus]:
        result = []
        for name in self.names:
            if name in self._models:
                error = self._models[name].explain_error
                reason = "" if error is None else f"inference only: {error}"
                result.append(ModelStatus(name, True, self._client_reason(name, reason)))
            elif name in self._failures:
                result.append(ModelStatus(name, False, self._failures[name]))
            else:
                result.append(ModelStatus(name, False, "loading"))
        return result

    def models(self) -> list[ServedModel]:
        return list(self._models.values())
