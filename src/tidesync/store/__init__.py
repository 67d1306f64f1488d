"""The local database on SQLite: models, transactions, queries, notifications, change log."""
