"""`bench report`: `build` gathers the sections, `plots` draws the figures (matplotlib, PNG data URIs),
`html` renders the page from the Jinja2 templates next to it.
"""
