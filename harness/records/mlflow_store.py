"""Reading and addressing the MLflow store: tag names, the client, paginated searches.
MLflow only (no torch, no Ray): `harness report` reads a study through this module."""
from __future__ import annotations

import http.client
import os
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.tracking import MlflowClient

from harness.config import ClusterError, ConfigError
from harness.records.results import TAG_OUTCOME  # (defined there: the report rules read it without MLflow)

TAG_SWEEP_DIR = "harness.sweep_dir"
TAG_TRIAL_ID = "harness.trial_id"
TAG_VARIANT = "harness.variant"
TAG_PHASE = "harness.phase"
TAG_STOP_REASON = "harness.stop_reason"
TAG_CLASSIFIER_KEY = "harness.classifier_cache_key"
TAG_KIND = "harness.kind"
TAG_PARENT = "mlflow.parentRunId"
TAG_OPTUNA_STUDY = "harness.optuna_study"
TAG_OPTUNA_TRIAL = "harness.optuna_trial"
TAG_OPTUNA_STORAGE = "harness.optuna_storage"  # on the parent: the sweep's DIR/optuna.db
TAG_NOTE = "mlflow.note.content"  # the run's description in MLflow's UI
# The experiment kind MLflow's own kind selector writes for training experiments. The 3.17 UI
# (workflow-based navigation) ignores it when choosing the first page and follows its GenAI /
# Model training switch, GenAI by default: hence `runs_table_url`, printed after every sweep.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

PAGE_SIZE = 1000


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///relative` or `sqlite:////absolute` URI (None for another
    scheme or an in-memory database)."""
    if not uri.startswith("sqlite://"):
        return None
    path = uri[len("sqlite://"):].split("?", 1)[0]
    path = path[1:] if path.startswith("/") else path
    return Path(path) if path else None


def check_tracking_uri(uri: str) -> None:
    """Refuse a plain path or a `file:` URI: MLflow reads it as its deprecated file store."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if scheme is None or len(scheme.group(1)) == 1 or scheme.group(1).lower() == "file":  # C:\... is a path
        path = Path(os.path.abspath(os.path.expanduser(re.sub(r"^file:(//)?", "", uri))))
        db = path if path.suffix == ".db" else path / "mlflow.db"
        raise ConfigError(f"--mlflow-uri: {uri[:80]} is a folder path, which MLflow reads as its deprecated file "
                          f"store; give a database, e.g. sqlite:///{db}, or a tracking server http://HOST:PORT")
    if scheme.group(1).lower().split("+")[0] == "sqlite":
        rest = uri[scheme.end():].split("?", 1)[0]
        if not (rest.startswith("///") and rest[3:]):  # sqlite://x.db: two slashes make x.db a host name
            meant = rest[2:] if rest.startswith("//") else rest
            if not meant.strip("/"):
                forms = "sqlite:///mlflow.db (relative to the working directory) or sqlite:///ABSOLUTE/PATH.db"
            elif meant.startswith("/"):
                forms = f"sqlite:///{meant[:80]} (sqlite:///ABSOLUTE/PATH.db)"
            else:
                forms = (f"sqlite:///{meant[:80]} (relative to the working directory) or "
                         f"sqlite:///{os.path.abspath(meant)[:120]} (sqlite:///ABSOLUTE/PATH.db)")
            raise ConfigError(f"--mlflow-uri: {uri[:80]} is not a valid SQLite URI; a SQLite store is sqlite: and "
                              f"three slashes before its path: give {forms}")


SERVER_TIMEOUT = 3.0  # seconds a tracking server has to answer the up-front check


class TrackingServerError(ClusterError):
    """The tracking server of an http(s) --mlflow-uri does not answer (exit code 3, like a cluster)."""


def check_server(uri: str, timeout: float = SERVER_TIMEOUT) -> None:
    """An http(s) tracking server answers, asked once with a short timeout before anything starts:
    MLflow's own client retries an unreachable one for minutes. Any HTTP answer will do (a 404 of a
    server without /health, a 401 of an authenticating proxy); so will a TLS error (MLflow has its
    own certificate settings). Other schemes are left alone."""
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        raise ConfigError(f"--mlflow-uri: {uri[:80]} has a port that is not a number; give http://HOST:PORT") from None
    if not parts.hostname:
        raise ConfigError(f"--mlflow-uri: {uri[:80]} names no host; give http://HOST:PORT")
    netloc = parts.netloc.rsplit("@", 1)[-1]  # credentials stay out of the check
    url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return
        if isinstance(reason, TimeoutError):
            why = f"no answer within {timeout:g} s"
        elif isinstance(reason, OSError):
            why = (reason.strerror or str(reason) or type(reason).__name__).lower()
        else:
            why = str(reason)[:80] or type(reason).__name__
    shown = f"{parts.scheme}://{netloc}{parts.path}"[:80]
    raise TrackingServerError(f"--mlflow-uri: no MLflow tracking server answers at {shown} ({why}); start the "
                              "server or check --mlflow-uri")


def require_store(uri: str) -> None:
    """Reading commands (report, compare) read a store and never create one: opening a SQLite URI
    whose file does not exist would create an empty store there."""
    check_tracking_uri(uri)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ConfigError(f"--mlflow-uri: no MLflow store at {path} (the file does not exist); a study writes "
                          "OUT/mlflow.db, so pass sqlite:///OUT/mlflow.db")
    check_server(uri)


def client_for(uri: str) -> MlflowClient:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return MlflowClient(tracking_uri=uri)


def search_all(client: MlflowClient, experiment_id: str, filter_string: str = "",
               order_by: list[str] | None = None, limit: int | None = None) -> list:
    """Every run matching `filter_string`, page by page (one search returns at most a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=PAGE_SIZE,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (limit is not None and len(runs) >= limit):
            return runs[:limit] if limit is not None else runs


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return search_all(client, experiment_id, f"tags.`{TAG_PARENT}` = '{parent_id}'")


def newest_parent(client: MlflowClient, experiment_id: str, kind: str):
    """The newest parent run of `kind` (study or sweep), found by its tag, or None."""
    found = client.search_runs([experiment_id], f"tags.`{TAG_KIND}` = '{kind}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None
