"""One error tree for everything the router tells a client.

Each error carries the HTTP status, OpenAI's ``type`` and a stable ``code``;
``router.api.errors`` renders them as ``{"error": {"message", "type", "code"}}``.
Transport errors from upstream are translated into this tree in ``router.proxy``
and nowhere else.

    RouterError
    ├── BadRequest (400)            malformed JSON, wrong types, invalid values
    │   └── TemplateRejected (400)  the chat template refused the messages
    ├── Unauthorized (401)          missing or unknown API key
    ├── Forbidden (403)             admin/debug endpoint without the admin token
    ├── NotFound (404)              unknown model, unknown route
    ├── PayloadTooLarge (413)       body over max_body_bytes
    ├── TooManyRequests (429)       admission queue full (Retry-After)
    ├── NoHealthyBackend (503)      nobody can serve this model now (Retry-After)
    ├── Overloaded (503)            admission deadline passed (Retry-After)
    ├── UpstreamError (502)         every replica tried failed before the first byte
    └── UpstreamTimeout (504)       no first byte within the timeout
"""

from __future__ import annotations


class RouterError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.param = param

    def to_dict(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class TemplateRejected(BadRequest):
    code = "chat_template_error"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(RouterError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class TooManyRequests(RouterError):
    status = 429
    type = "rate_limit_error"
    code = "router_queue_full"


class NoHealthyBackend(RouterError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_backend"


class Overloaded(RouterError):
    status = 503
    type = "service_unavailable"
    code = "overloaded"


class UpstreamError(RouterError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(RouterError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"
