"""The client: App, users, configurations, the public Database, and the sync client."""
