"""The walkthroughs' figure maker: ``python -m docs.figures`` (``make figures``)."""
