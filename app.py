"""Model Repair Dashboard: ``streamlit run app.py``.

Find the training examples behind a classifier's test failures, confirm them
by eye and repair the model by erasing their influence. The workspace folder
comes from the REPAIR_WORKSPACE environment variable (default ./workspace)
and can be changed in the sidebar.
"""

import streamlit as st

from repair_core import dashboard

# The favicon is an emoji: Streamlit 1.67 turns an emoji into an inline SVG
# favicon, but fetches the favicon of a Material icon from fonts.gstatic.com.
st.set_page_config(page_title="Model Repair Dashboard", page_icon="🩹", layout="wide")
dashboard.configure_logging()
dashboard.init_state()
dashboard.restore_from_url()
dashboard.save_to_url()

# The page scripts live in app_pages/ and not in pages/. Streamlit (1.67) treats
# a pages/ folder beside the entrypoint as a legacy multipage app until some
# session calls st.navigation, so a server whose first request opens a page URL
# runs that page alone, without this file and its sidebar.
# Page icons are Material Symbols, whose font Streamlit serves itself. Emoji
# icons show as empty boxes in a browser without a colour emoji font.
pages = [
    st.Page(
        "app_pages/setup.py", title="Setup", icon=":material/settings:", default=True
    ),
    st.Page("app_pages/failures.py", title="Failures", icon=":material/flag:"),
    st.Page("app_pages/causes.py", title="Causes", icon=":material/search:"),
    st.Page("app_pages/repair.py", title="Repair", icon=":material/healing:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/bar_chart:"),
]
navigation = st.navigation(pages)
dashboard.workspace_sidebar()
navigation.run()
dashboard.save_to_url()
