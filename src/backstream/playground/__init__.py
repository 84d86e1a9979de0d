"""The playground's page, script and style sheet: package data served by `backstream.http.playground`."""
