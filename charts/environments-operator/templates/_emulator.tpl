{{/* The emulator container: the same image, `environments-operator emulator`, state in memory. */}}
{{- define "environments-operator.emulatorContainer" -}}
- name: emulator
  image: {{ include "environments-operator.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - environments-operator
    - emulator
    # Every interface: worker pods reach it through its Service.
    - --host
    - 0.0.0.0
    - --port
    - {{ int .Values.emulator.port | quote }}
    {{- if .Values.emulator.verbose }}
    - --verbose
    {{- end }}
  ports:
    - name: emulator
      containerPort: {{ int .Values.emulator.port }}
      protocol: TCP
  readinessProbe:
    tcpSocket:
      port: emulator
    periodSeconds: 5
  livenessProbe:
    tcpSocket:
      port: emulator
    periodSeconds: 10
    failureThreshold: 6
  resources:
    {{- toYaml .Values.emulator.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}
