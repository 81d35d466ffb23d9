"""vpt-client: the Python SDK and `vpt` command line for a vpt-serve server.

    from vpt_client import Client
    vpt = Client()                       # $VPT_BASE_URL (default http://127.0.0.1:8000), $VPT_API_KEY
    job = vpt.train("digits", "data/digits/", method="vpt-deep", num_prompts=10)
    job.wait()
    vpt.predict("digits", ["a.png", "b.png"], top_k=3)
"""
from __future__ import annotations

from vpt_client._async_client import AsyncClient, AsyncJobHandle
from vpt_client._client import Client, JobHandle
from vpt_client._constants import __version__
from vpt_client._train_options import TrainOptions
from vpt_client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BusyError,
    ConflictError,
    InvalidDatasetError,
    InvalidInputError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ResponseValidationError,
    ServerError,
    UnsupportedMediaTypeError,
    VPTError,
    WaitTimeoutError,
)
from vpt_client.models import (
    Backbone,
    Health,
    Job,
    JobError,
    JobProgress,
    Prediction,
    PredictionResult,
    Readiness,
    Task,
    Timings,
    TopK,
    Version,
)

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncClient", "AsyncJobHandle",
    "AuthenticationError", "Backbone", "BadRequestError", "BusyError", "Client", "ConflictError",
    "Health", "InvalidDatasetError", "InvalidInputError", "Job", "JobError", "JobFailedError",
    "JobHandle", "JobProgress", "NotFoundError", "PayloadTooLargeError", "PermissionDeniedError",
    "Prediction", "PredictionResult", "Readiness", "ResponseValidationError", "ServerError", "Task", "Timings", "TopK",
    "TrainOptions", "UnsupportedMediaTypeError", "VPTError", "Version", "WaitTimeoutError", "__version__",
]
