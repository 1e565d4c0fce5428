"""SQL Server connection settings: the ``MSSQL_*`` parts assembled into a SQLAlchemy URL.

    python mssql_config.py                    # print the URL in force, password masked
    python mssql_config.py --create-database  # create the database if missing, then the tables

Set ``MSSQL_HOST`` (and ``MSSQL_USER``, ``MSSQL_PASSWORD``, ``MSSQL_DATABASE``,
``MSSQL_PORT``, ``MSSQL_DRIVER``) and leave ``DATABASE_URL`` unset; every service then uses
SQL Server through pyodbc with ``fast_executemany``.
"""

import logging
import re

import sqlalchemy as sa
import typer
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from churn_stream import storage
from churn_stream.errors import ConfigurationError
from churn_stream.logs import configure_logging
from churn_stream.settings import MssqlSettings

log = logging.getLogger("mssql_config")
app = typer.Typer(add_completion=False)

DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def mssql_url(settings: MssqlSettings | None = None, masked: bool = False) -> str:
    """The ``mssql+pyodbc://`` URL from the ``MSSQL_*`` environment variables."""
    settings = settings or MssqlSettings()
    if not settings.host:
        raise ConfigurationError("MSSQL_HOST is not set: SQL Server is not configured")
    return settings.url(masked=masked)


def create_database(settings: MssqlSettings, timeout_s: float = 120.0) -> None:
    """Create the database named by ``MSSQL_DATABASE`` if missing, waiting for the server."""
    if not DATABASE_NAME.match(settings.database):
        raise ConfigurationError(f"MSSQL_DATABASE {settings.database!r} is not a plain name")
    server = sa.engine.make_url(settings.url()).set(database="master")
    engine = sa.create_engine(server, isolation_level="AUTOCOMMIT")

    @retry(
        retry=retry_if_exception_type(sa.exc.OperationalError | sa.exc.InterfaceError),
        wait=wait_fixed(2),
        stop=stop_after_delay(timeout_s),
        reraise=True,
    )
    def attempt() -> None:
        with engine.connect() as conn:
            exists = conn.execute(sa.text("SELECT DB_ID(:name)"), {"name": settings.database})
            if exists.scalar() is None:
                # CREATE DATABASE takes no bind parameters; the name was checked against
                # DATABASE_NAME above and is bracket-quoted here.
                conn.exec_driver_sql(f"CREATE DATABASE [{settings.database}]")
                log.info("created database %s", settings.database)

    attempt()
    engine.dispose()


@app.command()
def main(
    create: bool = typer.Option(False, "--create-database", help="Create database and tables."),
) -> None:
    """Show the SQL Server URL in force, or create the database and its tables."""
    configure_logging()
    settings = MssqlSettings()
    log.info("SQL Server URL: %s", mssql_url(settings, masked=True))
    if create:
        create_database(settings)
        engine = storage.make_engine(mssql_url(settings))
        storage.create_schema(engine)
        log.info("schema ready in %s", settings.database)


if __name__ == "__main__":
    app()
