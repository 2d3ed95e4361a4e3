"""Scores and pictures, below the stages that use them: the log loss, logit / sigmoid, clipping
and the paired bootstrap (``metrics``), PNG plots written atomically (``plots``). It imports only
the core and ``util``; ``runs``, ``app``, ``audit`` and the built-in heads import it."""
