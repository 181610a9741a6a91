"""Ray token authentication of a matrix cluster.

`cluster up` (or the first head of an sbatch script) creates a random token
in ``<cluster dir>/ray_auth_token``, mode 0600, never readable by anyone
else even for an instant (a private temporary file hard-linked into place,
so it appears complete or not at all). Every Ray node and every driver that
joins gets Ray's own token mode through its environment::

    RAY_AUTH_MODE=token  RAY_AUTH_TOKEN_PATH=<cluster dir>/ray_auth_token

so the token itself is in no command line, environment, log or config. Ray
then refuses gRPC and dashboard requests without it. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from pathlib import Path

from matrix_hpc.cluster.errors import ClusterError

TOKEN_FILE = "ray_auth_token"
TOKEN_BYTES = 32  # 256 bits, as Ray's own `ray get-auth-token --generate`
#: Ray reads these at `import ray` (and `ray start`): the mode, and where the token is.
MODE_VAR, PATH_VAR, VALUE_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (0700) or check that only we can write it.

    A cluster dir that others can write lets them swap head.json (our driver
    would send the token to their server) or the token file itself.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ClusterError(f"cluster dir {path} is owned by uid {st.st_uid} with mode {stat.filemode(st.st_mode)}; "
                           f"it must be yours and writable by you alone: `chmod go-w {path}` or pick another "
                           "cluster.dir")


def create_token(token_file: Path) -> bool:
    """Create the token file unless one exists (then check it). True if created."""
    tmp = token_file.with_name(f".{token_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(TOKEN_BYTES))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, token_file)  # fails if a token exists: never replaces one a running node uses
        return True
    except FileExistsError:
        check_token(token_file)
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_token(token_file: Path) -> None:
    """Refuse a token file that is missing, a link, not ours, readable by others, or empty."""
    try:
        st = os.lstat(token_file)
    except FileNotFoundError:
        raise ClusterError(f"no Ray token at {token_file}: the cluster was not started by `matrix-hpc cluster up` "
                           "(or by an older matrix_hpc); run `matrix-hpc cluster down`, then `up`") from None
    problem = ""
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid != os.getuid():
        problem = f"is owned by uid {st.st_uid}, not you (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.filemode(st.st_mode)}; others could read it"
    elif st.st_size == 0:
        problem = "is empty"
    if problem:
        raise ClusterError(f"Ray token file {token_file} {problem}; remove it and run `matrix-hpc cluster down` "
                           "and `up` (a new token is made)")


def ray_auth_env(token_file: Path) -> dict[str, str]:
    """Environment that puts Ray (a node or a driver) in token mode with this cluster's token."""
    return {MODE_VAR: "token", PATH_VAR: str(token_file), "RAY_USAGE_STATS_ENABLED": "0"}


def node_env(token_file: Path) -> dict[str, str]:
    """This process's environment for ``ray start``: any token value of the caller dropped
    (Ray prefers it over the file), the cluster's token file named."""
    env = {k: v for k, v in os.environ.items() if k != VALUE_VAR}
    return {**env, **ray_auth_env(token_file)}


def use_cluster_token(token_file: Path) -> None:
    """Make this process's Ray (a driver about to join) use the cluster's token.

    Ray reads the mode and token when it is imported; when it already is
    (but not initialised), its cached settings are refreshed the way Ray's
    own ``_enable_token_auth`` does.
    """
    check_token(token_file)
    os.environ.pop(VALUE_VAR, None)
    os.environ.update(ray_auth_env(token_file))
    if "ray" in sys.modules:
        _refresh_ray_auth()


def _refresh_ray_auth() -> None:
    # Private Ray API (ray/_private/authentication/authentication_token_setup.py does the same);
    # a compiled module without type stubs.
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def private_local_token() -> None:
    """Before a local ``ray.init``: make Ray's default token file (``~/.ray/auth_token``) 0600.

    Ray itself writes it with the umask's mode (0644 usually), readable by
    every user who can enter your home directory. Nothing to do when the
    environment names a token or turns token mode off.
    """
    if os.environ.get(MODE_VAR, "token").lower() != "token" or os.environ.get(VALUE_VAR) or os.environ.get(PATH_VAR):
        return
    token_file = Path.home() / ".ray" / "auth_token"
    token_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(token_file) if token_file.exists() or token_file.is_symlink() else None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(token_file, 0o600)
    elif st is None:
        create_token(token_file)
