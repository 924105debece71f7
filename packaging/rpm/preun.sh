# mvps %preun: on erase ($1 = 0), stop the services before their binaries go.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl --no-reload disable --now mvps-s3-gc.timer mvps-s3-gc.service \
		mvps-te.service >/dev/null 2>&1 || :
fi
exit 0
