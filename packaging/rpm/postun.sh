# mvps %postun. RPM has no purge: erase removes the unmodified environment files and keeps
# modified ones as *.rpmsave; /var/lib/mvps (the images) and the mvps account stay.
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 0 ] && [ -d /var/lib/mvps ]; then
	echo "mvps: /var/lib/mvps (write-ahead logs and the local image store) was left in place;" \
		"delete it when its images are no longer needed: rm -rf /var/lib/mvps"
fi
exit 0
