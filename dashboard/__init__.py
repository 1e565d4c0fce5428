"""The live dashboard: read-only queries (``queries``), Plotly figures (``charts``), the app."""
