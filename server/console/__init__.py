"""The web console at ``/admin/ui``: server-rendered pages over the admin API's own serving functions.

``router.py`` holds the routes (HTTP only), ``sessions.py`` the login session and its cookie, ``csrf.py`` the form
tokens, ``forms.py`` turns form fields into the admin API's request models, ``rendering.py`` and ``templates/`` the
HTML (Jinja2, autoescaped). No JavaScript: a page that shows running jobs refreshes itself.
"""
