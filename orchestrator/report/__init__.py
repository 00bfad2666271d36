"""`bench report`: `build` gathers the sections (history's figures included: `regress.history` gives
the data), `plots` draws the figures (matplotlib, PNG data URIs), `html` renders them through the
Jinja2 templates in `templates/` (page, section, table and the few fixed paragraphs), autoescaped.
"""
