"""AppContext: what every handler needs (engine, settings, metrics, limits); lives on app.state.ctx."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.constrained.grammars import GrammarLimits

from .errors import APIError, loading
from .metrics import Metrics
from .offload import Offloader

if TYPE_CHECKING:
    from engine.core.async_engine import AsyncEngine

    from .runs import Run
    from .settings import ServerSettings

BUILD_INFO = "llamatron-0.1.0"


@dataclass(frozen=True)
class InputLimits:
    """Bounds checked before any per-request work (each exceeded: a 4xx naming the parameter)."""

    max_request_chars: int  # all text of one request (0: context x the longest token, see below)
    max_message_chars: int  # one message's text
    template_timeout_s: float
    grammar: GrammarLimits
    special_in_content: bool  # llama-server's behaviour: control-token text in content is parsed


class AppContext:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine, self.settings = engine, settings
        self.metrics = Metrics(engine.stats)
        self.model_id: str = settings.model_id()
        self.model_path = Path(settings.model)
        self.active: dict[str, Run] = {}  # base id -> its run, for /slots
        self.created = int(time.time())
        self.build_info = BUILD_INFO
        self.draining = False
        self.auth_required = False  # set by create_app: every route but /health needs a key
        grammar = GrammarLimits(max_chars=settings.max_grammar_chars, timeout_s=settings.grammar_timeout_s)
        self.offload = Offloader(budget_s=settings.template_timeout_s + grammar.timeout_s + 2.0)
        self._grammar_limits = grammar
        self._limits: InputLimits | None = None
        self._sampling_defaults = settings.sampling_defaults()

    @property
    def limits(self) -> InputLimits:
        """Resolved once the model is loaded: the default character bound is the context times
        the longest token, which no prompt that fits the context can exceed."""
        if self._limits is None:
            s = self.settings
            auto = self.engine.config.max_model_len * self.engine.tokenizer.max_token_chars
            request = s.max_input_chars or auto
            self._limits = InputLimits(request, min(s.max_message_chars or request, request),
                                       s.template_timeout_s, self._grammar_limits, s.parse_special_in_content)
        return self._limits

    @property
    def body_limit(self) -> int:
        """Bytes one request body may have: --max-body-mb, or by default what the text limit can
        use (12 JSON bytes per character, the worst escaping) plus 1 MiB for everything else.
        Parsing JSON holds the GIL, so a body much larger than any useful one would stall the
        event loop for nothing."""
        if self.settings.max_body_mb:
            return int(self.settings.max_body_mb * 2**20)
        return 12 * self.limits.max_request_chars + 2**20

    @property
    def ready(self) -> bool:
        return bool(self.engine.ready)

    @property
    def model_names(self) -> set[str]:
        resolved = Path(str(self.engine.config.model))
        return {self.model_id, *self.settings.aliases, self.settings.model, self.model_path.name,
                self.model_path.stem, str(resolved), resolved.name, resolved.stem}

    @property
    def sampling_defaults(self) -> dict[str, float | int]:
        return self._sampling_defaults

    @property
    def vocab_size(self) -> int:
        return min(self.engine.tokenizer.vocab_size, self.engine.model_config.vocab_size)

    @property
    def eog_ids(self) -> set[int]:
        return set(getattr(self.engine.tokenizer, "eog_ids", ()) or ())

    def check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"})
        if not self.ready:
            if self.engine.load_error:
                raise APIError(503, f"The model failed to load: {self.engine.load_error}", code="model_load_failed")
            raise loading()
