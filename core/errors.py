"""The one error tree of imgbot.

    ImgbotError                      every error we raise on purpose
    ├── UserError                    the user's input or standing is at fault
    │   ├── PromptError              the command text is malformed
    │   ├── BadReferenceError        a reference image cannot be used
    │   ├── AccessDenied             not allowed / blocked / not an admin
    │   ├── LimitExceeded            a spend limit would be exceeded
    │   ├── RateLimited              too many requests from this user
    │   ├── QueueFull                too many jobs waiting for this user
    │   ├── JobNotFound              a job id (button, refund) that is not there
    │   ├── DuplicateJob             the same platform message was already turned into a job
    │   ├── JobTakenOver             another process carries the job on (this one's lease ran out)
    │   └── Cancelled                the job was cancelled before it ran
    └── UpstreamError                the image API failed; `detail` keeps the raw answer
        ├── ContentPolicyError       moderation_blocked
        ├── UpstreamAuthError        401/403/404, unknown parameter: operator must fix config
        ├── UpstreamBalanceError     402 / insufficient balance or quota
        ├── UpstreamRateLimited      429 after the retries
        ├── UpstreamUnavailable      5xx, connection refused/reset
        ├── UpstreamTimeout          no answer in time
        ├── UpstreamRejected         400 the API refused the request as asked
        └── UpstreamMalformed        an answer we cannot read
            └── UpstreamCorruptImage a result image that does not decode fully (billed)

Every error has a message key (`core.messages`) and parameters, so it can be shown in the
user's language with `error.user_message(lang)`. `detail` is for logs only, and never holds
a secret. Third-party exceptions are translated at one boundary each (`core.images` for
httpx), with `raise … from err`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.types import Usage

# A front end's `text(lang, key, **params)`: its own keys, falling back to core's.
Texts = Callable[..., str]


# A message quotes what the user typed; a 4,000-character "word" must not make it longer
# than a chat message may be.
SHOWN_MAX = 200


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > SHOWN_MAX:
        return value[: SHOWN_MAX - 1] + "…"
    return value


class ImgbotError(Exception):
    """Base of every error imgbot raises on purpose."""

    key = "error.internal"

    def __init__(self, key: str | None = None, *, detail: str = "", **params: Any) -> None:
        if key is not None:
            self.key = key
        self.params = params
        self.detail = detail
        super().__init__(f"{self.key}: {detail}" if detail else self.key)

    def user_message(self, lang: str, texts: Texts | None = None) -> str:
        """Render the message fit to show the user, in their language.

        `texts` words it when a front end raised it with a key of its own (`tg.*`).
        """
        from core.messages import text

        render = texts or text
        return render(lang, self.key, **{k: _clip(v) for k, v in self.params.items()})

    @property
    def code(self) -> str:
        """Return a short stable code for the ledger and logs."""
        return self.key.rsplit(".", 1)[-1]


class UserError(ImgbotError):
    """The user's input or standing is at fault."""


class PromptError(UserError):
    key = "prompt.invalid"


class BadReferenceError(UserError):
    key = "ref.invalid"


class AccessDenied(UserError):
    key = "access.denied"


class LimitExceeded(UserError):
    key = "limit.exceeded"

    def user_message(self, lang: str, texts: Texts | None = None) -> str:
        """Render the refusal, plus a cheaper option that would fit when there is one."""
        from core.messages import text

        message = super().user_message(lang, texts)
        if self.params.get("suggestion"):
            message += "\n" + text(lang, "limit.try", suggestion=self.params["suggestion"])
        return message


class RateLimited(UserError):
    key = "rate.limited"


class QueueFull(UserError):
    key = "queue.full"


class JobNotFound(UserError):
    key = "job.not_found"


class DuplicateJob(UserError):
    key = "job.duplicate"


class JobTakenOver(UserError):
    """This process's lease on a job ran out (it was too slow to renew) and another process
    took the job over: that one carries it on and tells the user; this one lets go without
    a word (raised with silent=True)."""

    key = "job.taken_over"


class Cancelled(UserError):
    key = "job.cancelled"


class UpstreamError(ImgbotError):
    """The image API failed. `usage` is set when the answer reported usage anyway."""

    key = "upstream.error"

    def __init__(
        self,
        key: str | None = None,
        *,
        detail: str = "",
        status: int | None = None,
        usage: Usage | None = None,
        **params: Any,
    ) -> None:
        super().__init__(key, detail=detail, **params)
        self.status = status
        self.usage = usage

    # Whether the upstream billed the call although it failed for us: then it is charged
    # its usage, or the reservation when the answer gave none (see ImageService.charge_for).
    billed = False


class ContentPolicyError(UpstreamError):
    key = "upstream.moderation"


class UpstreamAuthError(UpstreamError):
    key = "upstream.auth"


class UpstreamBalanceError(UpstreamError):
    key = "upstream.balance"


class UpstreamRateLimited(UpstreamError):
    key = "upstream.rate_limited"


class UpstreamUnavailable(UpstreamError):
    key = "upstream.unavailable"


class UpstreamTimeout(UpstreamError):
    key = "upstream.timeout"


class UpstreamRejected(UpstreamError):
    key = "upstream.rejected"


class UpstreamMalformed(UpstreamError):
    key = "upstream.malformed"


class UpstreamCorruptImage(UpstreamMalformed):
    """A result image with a good header that does not fully decode (truncated, corrupt).

    The upstream drew and billed it, so the job is charged; found before the job counts
    as drawn, never at delivery.
    """

    key = "upstream.corrupt_image"
    billed = True


class DeliveryFailed(Exception):
    """A front end could not hand a result over (not the user's fault; never shown as is).

    `retryable`: the platform had a passing problem (5xx, network, time-out) and a later
    try may work; otherwise (a 4xx: chat gone, bot blocked) trying again is pointless.
    """

    def __init__(self, detail: str, *, retryable: bool) -> None:
        super().__init__(detail)
        self.retryable = retryable
