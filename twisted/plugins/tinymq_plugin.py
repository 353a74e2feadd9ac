"""The C{twistd tinymq} plugin."""

from tinymq._service import ServiceMaker

tinymq = ServiceMaker()
