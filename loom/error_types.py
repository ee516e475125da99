"""Error types shared by every layer, and the HTTP status the API answers each with."""


class ErrorType:
    INVALID_REQUEST = "invalid_request_error"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_NOT_LOADED = "model_not_loaded"
    MODEL_LOAD_FAILED = "model_load_error"
    CONTEXT_LENGTH = "context_length_exceeded"
    OVERLOADED = "overloaded_error"
    NO_WORKER = "no_worker_available"
    WORKER_LOST = "worker_lost"
    BROKER_LOST = "broker_lost"
    SHUTTING_DOWN = "server_shutting_down"  # the API is draining before it exits
    INTERNAL = "internal_error"


# HTTP status for each error type, used by the API for non-streaming answers.
HTTP_STATUS = {
    ErrorType.INVALID_REQUEST: 422,
    ErrorType.MODEL_NOT_FOUND: 404,
    ErrorType.MODEL_NOT_LOADED: 404,
    ErrorType.MODEL_LOAD_FAILED: 400,
    ErrorType.CONTEXT_LENGTH: 400,
    ErrorType.OVERLOADED: 429,
    ErrorType.NO_WORKER: 503,
    ErrorType.WORKER_LOST: 503,
    ErrorType.BROKER_LOST: 503,
    ErrorType.SHUTTING_DOWN: 503,
    ErrorType.INTERNAL: 500,
}
