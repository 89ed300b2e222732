"""Alembic environment: runs migrations on the URL that node.db.alembic_config() sets."""

from alembic import context
from sqlalchemy import create_engine

from node.db import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url is not None

connectable = create_engine(url)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
